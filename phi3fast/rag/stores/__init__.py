"""Where an index keeps its chunks: the built-in store (builtin.py) or a Milvus collection (milvus/).

`--store` takes a spec (parse_store); the manifest records the parsed form, and the index is opened and built
through open_store and open_writer, which pick the implementation (base.py has the interfaces).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from phi3fast.errors import ArgumentError, Phi3FastError
from phi3fast.rag.manifest import MANIFEST
from phi3fast.rag.stores.base import Store, StoreWriter
from phi3fast.rag.stores.builtin import BuiltinStore, BuiltinWriter


def parse_store(spec: str) -> dict:
    """`builtin`, or `milvus:URI` with URI http(s)://host:port or a Milvus Lite file (NAME.db, recorded
    absolute; its folder must exist)."""
    if spec == "builtin":
        return {"kind": "builtin"}
    kind, sep, uri = spec.partition(":")
    if kind != "milvus" or not sep:
        raise ArgumentError("store", f"{spec}: expected 'builtin' or 'milvus:URI'")
    if not uri:
        raise ArgumentError("store", f"{spec}: no URI after 'milvus:' (http://host:19530 or ./rag.db)")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri):
        if not re.match(r"^https?://[^/:\s]+(:\d+)?/?$", uri):
            raise ArgumentError(
                "store", f"{spec}: a Milvus server URI is http://host:port or https://host:port"
            )
        return {"kind": "milvus", "uri": uri.rstrip("/")}
    path = Path(uri).expanduser().resolve()
    if path.suffix != ".db":
        raise ArgumentError(
            "store", f"{spec}: a Milvus Lite file name must end in .db (e.g. milvus:./rag.db)"
        )
    if not path.parent.is_dir():
        raise ArgumentError("store", f"{spec}: no such directory {path.parent}")
    if path.exists() and not path.is_dir():  # Milvus Lite keeps its data in a folder named NAME.db
        raise ArgumentError("store", f"{spec}: {path} exists and is not a Milvus Lite database")
    return {"kind": "milvus", "uri": str(path)}


def same_store(a: dict, b: dict) -> bool:
    return a.get("kind") == b.get("kind") and a.get("uri") == b.get("uri")


def store_label(cfg: dict) -> str:
    return "the built-in store" if cfg.get("kind") == "builtin" else f"milvus:{cfg.get('uri')}"


def open_store(index_dir: Path, manifest: dict) -> Store:
    kind = manifest["store"].get("kind")
    if kind == "builtin":
        return BuiltinStore(index_dir, manifest)
    if kind == "milvus":
        from phi3fast.rag.stores.milvus import MilvusStore  # pymilvus loads only for a Milvus index

        return MilvusStore.open(index_dir, manifest)
    raise Phi3FastError(f"{index_dir / MANIFEST}: unknown store kind {kind!r} (a newer phi3fast wrote it?)")


def open_writer(
    out: Path,
    store: dict,
    prev: dict | None,
    fresh: bool,
    dim: int,
    progress: bool,
    warn: Callable[[str], None],
) -> StoreWriter:
    """A writer for one build of the index in `out`, whose store is `store` (a parse_store result)."""
    if store["kind"] == "builtin":
        return BuiltinWriter(out, prev, fresh, dim)
    from phi3fast.rag.stores.milvus import MilvusWriter

    return MilvusWriter(out, store, fresh, dim, progress, warn)
