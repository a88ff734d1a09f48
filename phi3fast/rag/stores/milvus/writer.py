"""Building into a Milvus collection: superseded rows marked, new rows written, one state write commits."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from phi3fast.errors import Phi3FastError
from phi3fast.rag.chunking import Chunk
from phi3fast.rag.stores.base import Plan, old_versions
from phi3fast.rag.stores.keywords import fts_tokens
from phi3fast.rag.stores.milvus.client import (
    MAX_TEXT,
    NEVER,
    ROW_FIELDS,
    chunk_id,
    chunk_schema,
    collection_name,
    connect,
    one_line,
    read_state,
    state_schema,
    vector_dim,
    visible,
)

BATCH_ROWS = 256  # rows per upsert: ~0.5 MB of 384-dim vectors plus text, well inside gRPC's 64 MB limit
RETRIES = 4  # attempts per batch before the run stops
BACKOFF_S = 0.5  # first retry after 0.5 s, then 1 s, 2 s: rides out a server restart or a leader switch
DELETE_FILES = 64  # files per delete request (an `in` list), keeps the filter expression short


class MilvusWriter:
    """One build into the collection (see "Visibility: epochs"): mark the old versions superseded, upsert the new
    chunks, both invisible to readers of the committed epoch; commit by bumping the state row's epoch."""

    def __init__(
        self, out: Path, cfg: dict, fresh: bool, dim: int, progress: bool, warn: Callable[[str], None]
    ) -> None:
        self.warn = warn
        self.cfg = {**cfg, "collection": cfg.get("collection") or collection_name(out)}
        self.uri = self.cfg["uri"]
        self.client = connect(self.cfg)
        self.name = self.cfg["collection"]
        self.state = self.name + "_state"
        self.progress = progress
        self.fresh = fresh
        self.committed = False
        self.bar = None
        self._retry(lambda: self._prepare(dim), [])

    def _prepare(self, dim: int) -> None:
        c = self.client
        if c.has_collection(self.name) and vector_dim(c, self.name) != dim:
            if not self.fresh:
                raise Phi3FastError(
                    f"milvus:{self.uri}: collection {self.name} holds {vector_dim(c, self.name)}-dim vectors, "
                    f"the embedder gives {dim}"
                )
            c.drop_collection(self.name)  # a new embedder of another size: nothing to keep
        if not c.has_collection(self.name):
            schema, params = chunk_schema(c, dim)
            # Strong: a search right after a commit sees it (the default, Bounded, may lag by seconds).
            c.create_collection(self.name, schema=schema, index_params=params, consistency_level="Strong")
        if not c.has_collection(self.state):
            schema, params = state_schema(c)
            c.create_collection(self.state, schema=schema, index_params=params, consistency_level="Strong")
        for name in (self.name, self.state):
            c.load_collection(name)
        e = self.epoch = read_state(c, self.state)[0]
        # Rows no reader of epoch E sees: a failed run's new rows, and versions superseded at E or before (kept
        # until now for a search that read an older epoch just before the last commit).
        c.delete(self.name, filter=f"added > {e} or removed <= {e}")
        # A failed run's marks (removed = E + 1) on rows that are still current: undo them.
        self._mark(f"removed > {e} and removed < {NEVER}", NEVER)
        # {file: (sha256, chunks)} of the committed build: one version per file (a commit switches whole builds).
        self.current: dict[str, tuple[str, int]] = {}
        it = c.query_iterator(self.name, batch_size=4096, filter=visible(e), output_fields=["file", "sha256"])
        try:
            while rows := it.next():
                for r in rows:
                    sha, n = self.current.get(r["file"], (r["sha256"], 0))
                    self.current[r["file"]] = (sha, n + 1)
        finally:
            it.close()

    def _mark(self, expr: str, removed: int, files: list[str] | None = None) -> None:
        """Rewrite the rows matching expr with `removed` set (Milvus Lite has no partial update: whole rows).
        Ids first, then the rows a batch at a time: an iterator must not walk rows that are being rewritten."""
        ids: list[int] = []
        it = self.client.query_iterator(self.name, batch_size=4096, filter=expr, output_fields=["id"])
        try:
            while rows := it.next():
                ids += [int(r["id"]) for r in rows]
        finally:
            it.close()
        fields = [f for f in ROW_FIELDS if f not in ("id", "removed")]
        for i in range(0, len(ids), BATCH_ROWS):
            got = self._retry(
                lambda i=i: self.client.get(self.name, ids=ids[i : i + BATCH_ROWS], output_fields=fields),
                files or [],
            )
            batch = [{**{f: r[f] for f in ["id", *fields]}, "removed": removed} for r in got]
            for row in batch:
                row["vector"] = [float(x) for x in row["vector"]]
            self._upsert(batch)

    def _retry(self, fn: Callable[[], object], files: list[str]) -> object:
        """Call fn, retrying with exponential backoff; then stop naming the files the batch held."""
        for attempt in range(RETRIES):
            try:
                return fn()
            except Phi3FastError:
                raise
            except Exception as e:
                if attempt == RETRIES - 1:
                    held = f"; files in it: {', '.join(sorted(set(files)))}" if files else ""
                    raise Phi3FastError(
                        f"milvus:{self.uri}: failed after {RETRIES} attempts ({one_line(e)}){held}; nothing "
                        "of this run is visible, re-run `phi3fast index` to retry"
                    ) from None
                time.sleep(BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def _upsert(self, rows: list[dict]) -> None:
        """Write a batch, with retries. Upsert: a retry after an attempt that stored part of the batch (and then
        failed) rewrites the same ids, never doubles them."""
        self._retry(lambda: self.client.upsert(self.name, rows), [r["file"] for r in rows])

    # -- the Writer interface --
    def file_hashes(self) -> dict[str, str]:
        return {} if self.fresh else {f: sha for f, (sha, _) in self.current.items()}

    def begin(self, plan: Plan, old: dict[str, str]) -> None:
        from tqdm import tqdm

        e = self.epoch
        self.gone = sorted(self.current) if self.fresh else sorted(old_versions(plan, old))
        # Superseded by this build: still visible to readers of E (removed > E), gone for readers of E + 1.
        for i in range(0, len(self.gone), DELETE_FILES):
            files = self.gone[i : i + DELETE_FILES]
            self._mark(f"{visible(e)} and file in [{', '.join(map(_quote, files))}]", e + 1, files)
        n = sum(len(chunks) for _, _, chunks in plan.todo)
        self.bar = tqdm(total=n, unit="chunks", desc="milvus upsert", disable=not self.progress, leave=False)

    def add(self, items: list[tuple[str, str, int, Chunk]], vectors: np.ndarray) -> None:
        added = self.epoch + 1
        for i in range(0, len(items), BATCH_ROWS):
            rows = []
            batch = items[i : i + BATCH_ROWS]
            toks = fts_tokens([t for *_, c in batch for t in (c.source, c.heading, c.text)])
            for j, ((file, sha, ordinal, c), v) in enumerate(
                zip(batch, vectors[i : i + BATCH_ROWS], strict=True)
            ):
                # BM25 input: source, heading, text as tokens, one line each (a phrase never spans two).
                keywords = " " + " \n ".join(" ".join(t) for t in toks[3 * j : 3 * j + 3]) + " "
                if max(len(x.encode()) for x in (c.text, c.heading, keywords)) > MAX_TEXT:
                    raise Phi3FastError(f"{file}: a chunk longer than Milvus's {MAX_TEXT}-byte text limit")
                rows.append(
                    {
                        "id": chunk_id(file, sha, added, ordinal),
                        "file": file,
                        "sha256": sha,
                        "added": added,
                        "removed": NEVER,
                        "source": c.source,
                        "heading": c.heading,
                        "start": c.start,
                        "end": c.end,
                        "text": c.text,
                        "keywords": keywords,
                        "vector": np.asarray(v, np.float32).tolist(),
                    }
                )
            self._upsert(rows)
            if self.bar is not None:
                self.bar.update(len(rows))

    def commit(self, plan: Plan, old: dict[str, str]) -> tuple[dict, bool]:
        if self.bar is not None:
            self.bar.close()
        gone = set(self.gone)
        kept = sum(n for f, (_, n) in self.current.items() if f not in gone)
        total = kept + sum(len(chunks) for _, _, chunks in plan.todo)
        fields = {"generation": "milvus", "store": self.cfg, "chunks": total, "sizes": {}}
        if not plan.todo and not gone and not self.fresh:
            return fields, False
        # Seal what this run wrote, once per build (as Milvus advises after a bulk load): Milvus builds the HNSW
        # and BM25 indexes of sealed segments, while growing ones are searched by scanning.
        self._retry(lambda: self.client.flush(self.name), [])
        row = {"id": 0, "epoch": self.epoch + 1, "chunks": total, "vector": [1.0, 0.0]}
        self._retry(lambda: self.client.upsert(self.state, [row]), [])  # the one write that switches readers
        self.committed = True
        return fields, True

    def cleanup(self) -> None:
        """Nothing now: the superseded rows stay one more build, for a search that read the previous epoch just
        before the commit; the next build deletes them first."""

    def abort(self) -> None:
        if self.bar is not None:
            self.bar.close()
        # Nothing to undo for readers: the rows of this run and its marks are invisible at the committed epoch,
        # and the next run clears them first (see _prepare).


def _quote(s: str) -> str:
    """A Milvus expression string literal."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
