"""Embedders from sentence-transformers: the bundled all-MiniLM-L6-v2 (offline), any sentence-transformers
folder or hub name, and models that ship their own modelling code (with trust_remote_code)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from phi3fast.errors import Phi3FastError
from phi3fast.rag.embedders.base import DEFAULT_EMBEDDER, Embedder, bundled_model_path, token_spans

BATCH_SIZE = 64  # 64 chunks of <=256 tokens keep a CPU busy without a large activation footprint


def _resolve(name: str) -> str:
    if name == DEFAULT_EMBEDDER:
        return bundled_model_path()
    return str(Path(name).resolve()) if Path(name).exists() else name


@contextlib.contextmanager
def quiet_transformers_progress() -> Iterator[None]:
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


class SentenceTransformerEmbedder(Embedder):
    """A loaded sentence-transformers model. Thread-safe: one lock around the model (fast tokenizers raise
    'Already borrowed' when two threads use one at once, and torch already uses every core per call)."""

    def __init__(self, name: str, device: str | None = None, *, trust_remote_code: bool = False) -> None:
        """name: the canonical name (see load_embedder): a bundled name, a hub name or an absolute folder."""
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.trust_remote_code = trust_remote_code
        try:
            # trust_remote_code: models such as jina-embeddings ship their own modelling code; it runs only when
            # the user asked for it (--trust-remote-code).
            with quiet_transformers_progress():
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

    def token_offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Character spans of each text's tokens (no special tokens, no truncation)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        with self._lock:
            if backend is not None:
                return token_spans(backend, texts)
            out = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            return [[tuple(o) for o in offs if o[1] > o[0]] for offs in out["offset_mapping"]]

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
