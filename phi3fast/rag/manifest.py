"""INDEX_DIR/MANIFEST.json: what an index is (its store, embedder, chunking, generation), read and written whole.

    {"format", "version", "generation", "store": {kind, ...},
     "embedder": {name, dim, max_seq_length, trust_remote_code}, "reranker": {name} | null,
     "chunk_tokens", "overlap", "chunks", "files", "sizes": {file: bytes}}

The manifest is the one switch of a build: a build writes its store's files first, then replaces the manifest
atomically, so a reader sees the old index or the new one whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from phi3fast._utils import fsync
from phi3fast.errors import Phi3FastError

FORMAT = "phi3fast-rag-index"
VERSION = 1
MANIFEST = "MANIFEST.json"


def read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Phi3FastError(f"{path}: corrupt index manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise Phi3FastError(f"{path}: not a phi3fast RAG index manifest")
    if m.get("version") != VERSION:
        raise Phi3FastError(f"{path}: index format version {m.get('version')}, this phi3fast reads {VERSION}")
    try:
        int(m["embedder"]["dim"]), str(m["generation"]), int(m["chunks"]), dict(m["sizes"])
        # Written before stores had kinds, or before rerankers: the defaults of then.
        if not isinstance(m.setdefault("store", {"kind": "builtin"}), dict):
            raise TypeError
        reranker = m.setdefault("reranker", None)
        if reranker is not None and not isinstance(reranker.get("name"), str):
            raise TypeError
    except (KeyError, TypeError, ValueError, AttributeError):
        raise Phi3FastError(f"{path}: corrupt index manifest (missing fields)") from None
    return m


def write_manifest(out: Path, manifest: dict) -> None:
    """Atomically: readers see the old manifest or the new one, never a mix."""
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    fsync(tmp)
    os.replace(tmp, out / MANIFEST)
    fsync(out)
