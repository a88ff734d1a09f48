"""Searching a Milvus collection: the committed epoch's rows (see "Visibility: epochs" in the package doc)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from phi3fast.errors import Phi3FastError
from phi3fast.rag.manifest import MANIFEST
from phi3fast.rag.stores.base import EXPORT_COLUMNS, ChunkRow
from phi3fast.rag.stores.keywords import fts_tokens, identifier_forms, identifiers, query_terms
from phi3fast.rag.stores.milvus.client import connect, one_line, read_state, vector_dim, visible
from phi3fast.rag.stores.vectors import EF_SEARCH

_OUT = ["source", "heading", "start", "end", "text"]


class MilvusStore:
    """An opened collection. Thread-safe: pymilvus clients are (one gRPC channel)."""

    def __init__(self, client, manifest: dict) -> None:
        self.client, self.manifest = client, manifest
        self.cfg, self.dim = manifest["store"], int(manifest["embedder"]["dim"])
        self.collection = self.cfg["collection"]
        self.state = self.collection + "_state"

    @classmethod
    def open(cls, index_dir: Path, manifest: dict) -> MilvusStore:
        cfg, dim = manifest["store"], int(manifest["embedder"]["dim"])
        if not isinstance(cfg.get("uri"), str) or not isinstance(cfg.get("collection"), str):
            raise Phi3FastError(f"{index_dir / MANIFEST}: corrupt index manifest (store without uri)")
        client = connect(cfg)
        name = cfg["collection"]
        try:
            missing = [c for c in (name, name + "_state") if not client.has_collection(c)]
            if missing:
                raise Phi3FastError(
                    f"{index_dir}: its Milvus collection {missing[0]} is not in milvus:{cfg['uri']} (dropped? "
                    "rebuild the index with `phi3fast index`)"
                )
            if vector_dim(client, name) != dim:
                raise Phi3FastError(
                    f"{index_dir}: Milvus collection {name} holds {vector_dim(client, name)}-dim vectors, "
                    f"the manifest says {dim}"
                )
            for c in (name, name + "_state"):
                client.load_collection(c)  # a server (or a fresh Milvus Lite process) keeps them released
        except Phi3FastError:
            raise
        except Exception as e:
            raise Phi3FastError(
                f"milvus:{cfg['uri']}: cannot open collection {name}: {one_line(e)}"
            ) from None
        return cls(client, manifest)

    def view(self) -> MilvusView:
        try:
            epoch, chunks = read_state(self.client, self.state)
        except Exception as e:
            raise Phi3FastError(f"milvus:{self.cfg['uri']}: {one_line(e)}") from None
        return MilvusView(self, epoch, chunks)


class MilvusView:
    """The chunks of the committed build `epoch` (see "Visibility: epochs")."""

    def __init__(self, backend: MilvusStore, epoch: int, chunks: int) -> None:
        self.b = backend
        self.epoch = epoch
        self.chunks = chunks
        self.visible = visible(epoch)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise Phi3FastError(f"milvus:{self.b.cfg['uri']}: {one_line(e)}") from None

    def count(self) -> int:
        return self.chunks

    def _search(
        self, data: list, field: str, k: int, params: dict, extra: str = ""
    ) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        hits = self._call(
            self.b.client.search,
            self.b.collection,
            data=data,
            anns_field=field,
            limit=k,
            filter=self.visible + (f" and ({extra})" if extra else ""),
            output_fields=["start"],  # the least to ship back; rows() fetches the few that are kept
            search_params=params,
        )[0]
        # Milvus reports BM25 as a score (higher is better), Milvus Lite as its negative (a distance); both
        # come best first. abs() gives the built-in store's convention; zero-score rows matched nothing.
        out = [(int(h["id"]), float(h["distance"])) for h in hits]
        if field == "sparse":
            out = [(i, abs(s)) for i, s in out if s != 0.0]
        return out

    def dense(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        params = {"metric_type": "COSINE", "params": {"ef": max(EF_SEARCH, k)}}
        return self._search([np.asarray(vector, np.float32).tolist()], "vector", k, params)

    def keyword(self, question: str, k: int, extra: str = "") -> list[tuple[int, float]]:
        tokens = [t for toks in fts_tokens(query_terms(question)) for t in toks]
        if not tokens:
            return []
        return self._search([" ".join(tokens)], "sparse", k, {"metric_type": "BM25"}, extra)

    def identifier(self, question: str, k: int) -> list[tuple[int, float]]:
        # Each identifier in its spellings (keywords.py, "one code, several spellings"), each spelling as its
        # token phrase ("XR-7755" -> " xr 7755 "): the FTS5 phrase match of the built-in store, as a LIKE over the
        # space-separated tokens. Tokens are alphanumeric: no quote or wildcard in them.
        has, phrases = [], []
        for word in identifiers(question):
            forms = [" ".join(toks) for toks in fts_tokens(identifier_forms(word)) if toks]
            if forms:
                has.append("(" + " or ".join(f'keywords like "% {p} %"' for p in forms) + ")")
                phrases += forms
        if not phrases:
            return []
        query = " ".join(phrases)
        return self.keyword(query, k, " and ".join(has)) or self.keyword(query, k, " or ".join(has))

    def rows(self, ids: list[int]) -> dict[int, ChunkRow]:
        if not ids:
            return {}
        got = self._call(self.b.client.get, self.b.collection, ids=[int(i) for i in ids], output_fields=_OUT)
        return {
            int(r["id"]): ChunkRow(
                int(r["id"]), r["source"], r["heading"], int(r["start"]), int(r["end"]), r["text"]
            )
            for r in got
        }

    def export_batches(self, batch_size: int) -> Iterator[dict[str, list]]:
        fields = [c for c in EXPORT_COLUMNS if c != "id"]
        it = self._call(
            self.b.client.query_iterator,
            self.b.collection,
            batch_size=batch_size,
            filter=self.visible,
            output_fields=fields,
        )
        try:
            while rows := self._call(it.next):
                cols = {c: [r[c] for r in rows] for c in EXPORT_COLUMNS}
                cols["vector"] = [list(map(float, v)) for v in cols["vector"]]
                yield cols
        finally:
            it.close()
