"""The Milvus store: chunks, metadata, vectors and the BM25 keyword index in one Milvus collection, so every
query server that can reach the Milvus server sees the same index.

    phi3fast index docs/ --out company.idx --store milvus:http://milvus.internal:19530   (token: $MILVUS_TOKEN)
    phi3fast index docs/ --out company.idx --store milvus:./rag.db                       (Milvus Lite, local)

INDEX_DIR keeps only MANIFEST.json (the store: uri and collection; the embedder; the chunking) and the writer
lock; `phi3fast query --index INDEX_DIR` reads the manifest and searches the collection.

Collection `phi3fast_<dir>_<hash>`: one row per chunk
    id INT64 (primary key)   file, sha256 (the file version)   added, removed (build epochs)
    source, heading, start, end, text   keywords (source, heading and text as FTS5 tokens)
    vector FLOAT_VECTOR (HNSW, COSINE)   sparse SPARSE_FLOAT_VECTOR (Milvus's BM25 function over `keywords`)
and `<collection>_state`: one row, the committed build epoch E and its chunk count.

Visibility: epochs
------------------
Milvus has no multi-row transactions, so readers filter on epochs and a build switches them with one write.
A search reads E from the state row and sees the rows with `added <= E and removed > E`. A build:
1. marks the rows of changed and deleted files removed = E + 1 (rewritten whole: still visible at E);
2. writes the new chunks with added = E + 1 (invisible at E), in batches;
3. commits: one single-row upsert of the state row to E + 1. Readers then see the new build whole, and
   nothing of the old versions; before it, the old build whole. Never half a file, never half a run.
The superseded rows stay one more build (a search that read E just before the commit still finds them); the
next build deletes rows with removed <= E first, and also cleans up after a failed run: its rows
(added > E) and its marks (removed = E + 1 on rows that are still current). Chunk ids are a hash of
(file, sha256, epoch, ordinal), so a retried upsert of a batch overwrites instead of doubling.

Keyword search: Milvus's analyzers differ between servers (tantivy, with stemmers) and Milvus Lite (a regex),
so phi3fast gives the BM25 function text that is already tokenized by the built-in store's FTS5 tokenizer
(store.fts_tokens: lowercase, accents folded, porter-stemmed), and tokenizes questions the same way (stopwords
dropped, as for FTS5): both stores, and Lite and servers, match the same words. Exact identifiers (XR-7755)
are matched as the FTS5 phrase of their tokens (LIKE '% xr 7755 %' over `keywords`), ranked by BM25.
BM25's constants and column weighting differ from FTS5's, so lower ranks can swap.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from phi3fast.errors import Phi3FastError
from phi3fast.rag.backend import EXPORT_COLUMNS, ChunkRow, Plan, old_versions
from phi3fast.rag.chunking import Chunk
from phi3fast.rag.store import fts_tokens, identifiers, query_terms
from phi3fast.rag.vectors import EF_CONSTRUCTION, EF_SEARCH, M

BATCH_ROWS = 256  # rows per upsert: ~0.5 MB of 384-dim vectors plus text, well inside gRPC's 64 MB limit
RETRIES = 4  # attempts per batch before the run stops
BACKOFF_S = 0.5  # first retry after 0.5 s, then 1 s, 2 s: rides out a server restart or a leader switch
DELETE_FILES = 64  # files per delete request (an `in` list), keeps the filter expression short
MAX_TEXT = 65_535  # Milvus VARCHAR limit, in bytes
_OUT = ["source", "heading", "start", "end", "text"]
_ROW_FIELDS = [
    "id",
    "file",
    "sha256",
    "added",
    "removed",
    "source",
    "heading",
    "start",
    "end",
    "text",
    "keywords",
    "vector",
]
NEVER = 1 << 62  # `removed` of a current row


def _visible(epoch: int) -> str:
    """The rows of the committed build `epoch`: written by it or before, not superseded by it or before."""
    return f"added <= {epoch} and removed > {epoch}"


# -- the store spec -----------------------------------------------------------------------------------------


def parse_store(spec: str) -> dict:
    """`builtin`, or `milvus:URI` with URI http(s)://host:port or a Milvus Lite file (NAME.db, recorded
    absolute; its folder must exist)."""
    if spec == "builtin":
        return {"kind": "builtin"}
    kind, sep, uri = spec.partition(":")
    if kind != "milvus" or not sep:
        raise Phi3FastError(f"--store {spec}: expected 'builtin' or 'milvus:URI'")
    if not uri:
        raise Phi3FastError(f"--store {spec}: no URI after 'milvus:' (http://host:19530 or ./rag.db)")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri):
        if not re.match(r"^https?://[^/:\s]+(:\d+)?/?$", uri):
            raise Phi3FastError(
                f"--store {spec}: a Milvus server URI is http://host:port or https://host:port"
            )
        return {"kind": "milvus", "uri": uri.rstrip("/")}
    path = Path(uri).expanduser().resolve()
    if path.suffix != ".db":
        raise Phi3FastError(f"--store {spec}: a Milvus Lite file name must end in .db (e.g. milvus:./rag.db)")
    if not path.parent.is_dir():
        raise Phi3FastError(f"--store {spec}: no such directory {path.parent}")
    if path.exists() and not path.is_dir():  # Milvus Lite keeps its data in a folder named NAME.db
        raise Phi3FastError(f"--store {spec}: {path} exists and is not a Milvus Lite database")
    return {"kind": "milvus", "uri": str(path)}


def same_store(a: dict, b: dict) -> bool:
    return a.get("kind") == b.get("kind") and a.get("uri") == b.get("uri")


def store_label(cfg: dict) -> str:
    return "the built-in store" if cfg.get("kind") == "builtin" else f"milvus:{cfg.get('uri')}"


def collection_name(out: Path) -> str:
    """One collection per index directory: readable, and unique per absolute path."""
    path = str(out.resolve())
    slug = re.sub(r"[^A-Za-z0-9]+", "_", out.resolve().name).strip("_")[:40] or "index"
    return f"phi3fast_{slug}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def chunk_id(file: str, sha256: str, epoch: int, ordinal: int) -> int:
    """Deterministic 63-bit id: a retried upsert of a batch overwrites, never duplicates. The epoch is in it so
    a build never overwrites a visible row (re-chunking an unchanged file gives new ids)."""
    h = hashlib.blake2b(f"{file}\0{sha256}\0{epoch}\0{ordinal}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") & ((1 << 63) - 1)


# -- the client ---------------------------------------------------------------------------------------------


def _pymilvus():  # noqa: ANN202
    try:
        import pymilvus
    except ImportError:
        raise Phi3FastError(
            "the Milvus store needs pymilvus and milvus-lite: pip install 'phi3fast[milvus]'"
        ) from None
    # pymilvus (and Milvus Lite, in-process) log every failure with a traceback; we report them in one line.
    for name in ("pymilvus", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return pymilvus


def _one_line(e: BaseException) -> str:
    msg = getattr(e, "message", None) or str(e)
    return " ".join(str(msg).split())


def connect(cfg: dict):  # noqa: ANN201  (pymilvus.MilvusClient)
    pymilvus = _pymilvus()
    uri = cfg["uri"]
    try:
        if uri.startswith(("http://", "https://")):
            return pymilvus.MilvusClient(uri=uri, token=os.environ.get("MILVUS_TOKEN", ""), timeout=10)
        if not Path(uri).parent.is_dir():
            raise Phi3FastError(f"milvus:{uri}: no such directory {Path(uri).parent}")
        return pymilvus.MilvusClient(uri)
    except Phi3FastError:
        raise
    except Exception as e:  # refused, unknown host, bad token, Milvus Lite unable to start
        why = _one_line(e)
        if not uri.startswith(("http://", "https://")) and _locked_by_another(Path(uri) / "LOCK"):
            why = (
                "another process has this Milvus Lite database open (Milvus Lite serves one process at a time; "
                "share an index through a Milvus server)"
            )
        raise Phi3FastError(f"cannot connect to Milvus at {uri}: {why}") from None


def _locked_by_another(lock: Path) -> bool:
    """Whether Milvus Lite's data-directory lock (an flock on NAME.db/LOCK) is held elsewhere."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the lock if we got it
    return False


def _schema(client, dim: int):  # noqa: ANN001, ANN202
    pm = _pymilvus()
    DataType, Function, FunctionType = pm.DataType, pm.Function, pm.FunctionType
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("file", DataType.VARCHAR, max_length=4096)
    schema.add_field("sha256", DataType.VARCHAR, max_length=64)
    schema.add_field("added", DataType.INT64)
    schema.add_field("removed", DataType.INT64)
    schema.add_field("source", DataType.VARCHAR, max_length=4096)
    schema.add_field("heading", DataType.VARCHAR, max_length=MAX_TEXT)
    schema.add_field("start", DataType.INT64)
    schema.add_field("end", DataType.INT64)
    schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT)
    schema.add_field("keywords", DataType.VARCHAR, max_length=MAX_TEXT, enable_analyzer=True)
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_function(
        Function(
            name="text_bm25",
            function_type=FunctionType.BM25,
            input_field_names=["keywords"],
            output_field_names=["sparse"],
        )
    )
    params = client.prepare_index_params()
    params.add_index(
        "vector", index_type="HNSW", metric_type="COSINE", params={"M": M, "efConstruction": EF_CONSTRUCTION}
    )
    params.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    return schema, params


def _state_schema(client):  # noqa: ANN001, ANN202
    DataType = _pymilvus().DataType
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("epoch", DataType.INT64)
    schema.add_field("chunks", DataType.INT64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus wants a vector field in a collection
    params = client.prepare_index_params()
    params.add_index("vector", index_type="FLAT", metric_type="L2")
    return schema, params


def _vector_dim(client, name: str) -> int:  # noqa: ANN001
    """The collection's vector dimension, after checking it has every field this phi3fast reads and writes."""
    fields = {f["name"]: f for f in client.describe_collection(name)["fields"]}
    missing = [f for f in _ROW_FIELDS if f not in fields]
    if missing:
        raise Phi3FastError(
            f"Milvus collection {name} has no field '{missing[0]}': not a phi3fast index of this version "
            "(index into a new --out)"
        )
    return int(fields["vector"]["params"]["dim"])


def _read_state(client, state: str) -> tuple[int, int]:  # noqa: ANN001
    rows = client.get(state, ids=[0], output_fields=["epoch", "chunks"])
    return (int(rows[0]["epoch"]), int(rows[0]["chunks"])) if rows else (0, 0)


# -- reading ------------------------------------------------------------------------------------------------


class MilvusBackend:
    """An opened collection. Thread-safe: pymilvus clients are (one gRPC channel)."""

    def __init__(self, client, cfg: dict, dim: int) -> None:  # noqa: ANN001
        self.client, self.cfg, self.dim = client, cfg, dim
        self.collection = cfg["collection"]
        self.state = self.collection + "_state"

    @classmethod
    def open(cls, cfg: dict, dim: int, index_dir: Path) -> MilvusBackend:
        if not isinstance(cfg.get("uri"), str) or not isinstance(cfg.get("collection"), str):
            raise Phi3FastError(f"{index_dir}/MANIFEST.json: corrupt index manifest (store without uri)")
        client = connect(cfg)
        name = cfg["collection"]
        try:
            missing = [c for c in (name, name + "_state") if not client.has_collection(c)]
            if missing:
                raise Phi3FastError(
                    f"{index_dir}: its Milvus collection {missing[0]} is not in milvus:{cfg['uri']} (dropped? "
                    "rebuild the index with `phi3fast index`)"
                )
            if _vector_dim(client, name) != dim:
                raise Phi3FastError(
                    f"{index_dir}: Milvus collection {name} holds {_vector_dim(client, name)}-dim vectors, "
                    f"the manifest says {dim}"
                )
            for c in (name, name + "_state"):
                client.load_collection(c)  # a server (or a fresh Milvus Lite process) keeps them released
        except Phi3FastError:
            raise
        except Exception as e:
            raise Phi3FastError(
                f"milvus:{cfg['uri']}: cannot open collection {name}: {_one_line(e)}"
            ) from None
        return cls(client, cfg, dim)

    def view(self) -> MilvusView:
        try:
            epoch, chunks = _read_state(self.client, self.state)
        except Exception as e:
            raise Phi3FastError(f"milvus:{self.cfg['uri']}: {_one_line(e)}") from None
        return MilvusView(self, epoch, chunks)


class MilvusView:
    """The chunks of the committed build `epoch` (see "Visibility: epochs")."""

    def __init__(self, backend: MilvusBackend, epoch: int, chunks: int) -> None:
        self.b = backend
        self.epoch = epoch
        self.chunks = chunks
        self.visible = _visible(epoch)

    def _call(self, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise Phi3FastError(f"milvus:{self.b.cfg['uri']}: {_one_line(e)}") from None

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
        # Each identifier as its token phrase ("XR-7755" -> " xr 7755 "): the FTS5 phrase match of the built-in
        # store, as a LIKE over the space-separated tokens. Tokens are alphanumeric: no quote or wildcard in them.
        phrases = [" ".join(toks) for toks in fts_tokens(identifiers(question)) if toks]
        if not phrases:
            return []
        has = [f'keywords like "% {p} %"' for p in phrases]
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


# -- writing ------------------------------------------------------------------------------------------------


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
        if c.has_collection(self.name) and _vector_dim(c, self.name) != dim:
            if not self.fresh:
                raise Phi3FastError(
                    f"milvus:{self.uri}: collection {self.name} holds {_vector_dim(c, self.name)}-dim vectors, "
                    f"the embedder gives {dim}"
                )
            c.drop_collection(self.name)  # a new embedder of another size: nothing to keep
        if not c.has_collection(self.name):
            schema, params = _schema(c, dim)
            # Strong: a search right after a commit sees it (the default, Bounded, may lag by seconds).
            c.create_collection(self.name, schema=schema, index_params=params, consistency_level="Strong")
        if not c.has_collection(self.state):
            schema, params = _state_schema(c)
            c.create_collection(self.state, schema=schema, index_params=params, consistency_level="Strong")
        for name in (self.name, self.state):
            c.load_collection(name)
        e = self.epoch = _read_state(c, self.state)[0]
        # Rows no reader of epoch E sees: a failed run's new rows, and versions superseded at E or before (kept
        # until now for a search that read an older epoch just before the last commit).
        c.delete(self.name, filter=f"added > {e} or removed <= {e}")
        # A failed run's marks (removed = E + 1) on rows that are still current: undo them.
        self._mark(f"removed > {e} and removed < {NEVER}", NEVER)
        # {file: (sha256, chunks)} of the committed build: one version per file (a commit switches whole builds).
        self.current: dict[str, tuple[str, int]] = {}
        it = c.query_iterator(
            self.name, batch_size=4096, filter=_visible(e), output_fields=["file", "sha256"]
        )
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
        fields = [f for f in _ROW_FIELDS if f not in ("id", "removed")]
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
                        f"milvus:{self.uri}: failed after {RETRIES} attempts ({_one_line(e)}){held}; nothing "
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
            self._mark(f"{_visible(e)} and file in [{', '.join(map(_quote, files))}]", e + 1, files)
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
