"""The Milvus store: chunks, metadata, vectors and the BM25 keyword index in one Milvus collection, so every
query server that can reach the Milvus server sees the same index.

    phi3fast index docs/ --out company.idx --store milvus:http://milvus.internal:19530   (token: $MILVUS_TOKEN)
    phi3fast index docs/ --out company.idx --store milvus:./rag.db                       (Milvus Lite, local)

INDEX_DIR keeps only MANIFEST.json (the store: uri and collection; the embedder; the chunking) and the writer
lock; `phi3fast query --index INDEX_DIR` reads the manifest and searches the collection.

Collection `phi3fast_<dir>_<hash>`: one row per chunk
    id INT64 (primary key)  file, sha256 (the file version), added (build epoch)  source, heading, start, end, text
    vector FLOAT_VECTOR (HNSW, COSINE)   sparse SPARSE_FLOAT_VECTOR (Milvus's BM25 function over `text`)
and `<collection>_state`: one row, the committed build epoch E and its chunk count.

Visibility: epochs
------------------
Milvus has no multi-row transactions, so a build never edits visible rows in place:
1. Every chunk it writes carries added = E + 1; every search filters on `added <= E`, so none of them is visible
   (a half-written file, or a half-written build, is never seen).
2. Commit = one single-row upsert of the state row to E + 1: every new chunk becomes visible at once.
3. Then the old versions of changed and deleted files (added <= E) are deleted, a file per delete request.
Between 2 and 3 a changed file shows both its old and its new chunks for a moment: never half of either.
A failed or interrupted run leaves rows with added > E that nobody sees; the next run deletes them first (and
old versions a crash left between 2 and 3: per file, only the newest version is kept).
Chunk ids are a hash of (file, sha256, epoch, ordinal), so a retried batch is idempotent.

Keyword search differs from the built-in store's FTS5 in details only: Milvus's standard analyzer (lowercase
words, no stemming) over the chunk text; the same stopwords are dropped from the question first. Exact
identifiers (XR-7755) are matched with LIKE '%XR-7755%' filters (as written, upper or lower case) ranked by
BM25, where FTS5 matches the token phrase: the same chunks in practice, found the same way.
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
    for f in client.describe_collection(name)["fields"]:
        if f["name"] == "vector":
            return int(f["params"]["dim"])
    raise Phi3FastError(f"Milvus collection {name} has no 'vector' field: not a phi3fast index")


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
        self.visible = f"added <= {epoch}"

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
    """One build into the collection (see "Visibility: epochs"): upsert new chunks invisibly, in batches with
    retries; commit by bumping the state row's epoch; then delete the old versions."""

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
        self.committed = False
        self.bar = None
        self._retry(lambda: self._prepare(dim, fresh), [])

    def _prepare(self, dim: int, fresh: bool) -> None:
        c = self.client
        if c.has_collection(self.name) and _vector_dim(c, self.name) != dim:
            if not fresh:
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
        self.epoch, _ = _read_state(c, self.state)
        # Leftovers of a failed run: rows nobody sees (added > E).
        c.delete(self.name, filter=f"added > {self.epoch}")
        # {file: (sha256, added, chunks)}: the newest committed version of each file; older ones are stale.
        versions: dict[str, dict[tuple[str, int], int]] = {}
        it = c.query_iterator(
            self.name,
            batch_size=4096,
            filter=f"added <= {self.epoch}",
            output_fields=["file", "sha256", "added"],
        )
        try:
            while rows := it.next():
                for r in rows:
                    key = (r["sha256"], int(r["added"]))
                    per = versions.setdefault(r["file"], {})
                    per[key] = per.get(key, 0) + 1
        finally:
            it.close()
        self.current: dict[str, tuple[str, int, int]] = {}
        self.stale: list[tuple[str, int]] = []  # (file, added) of superseded versions a crash left behind
        for file, per in versions.items():
            (sha, added), n = max(per.items(), key=lambda t: t[0][1])
            self.current[file] = (sha, added, n)
            self.stale += [(file, a) for (_, a) in per if a != added]
        self.fresh = fresh

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
        return {} if self.fresh else {f: sha for f, (sha, _, _) in self.current.items()}

    def begin(self, plan: Plan, old: dict[str, str]) -> None:
        from tqdm import tqdm

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
        gone = set(old_versions(plan, old))
        if self.fresh:
            gone = set(self.current)
        kept = sum(n for f, (_, _, n) in self.current.items() if f not in gone)
        total = kept + sum(len(chunks) for _, _, chunks in plan.todo)
        self.drop = sorted(gone)
        fields = {"generation": "milvus", "store": self.cfg, "chunks": total, "sizes": {}}
        if not plan.todo and not gone and not self.stale and not self.fresh:
            return fields, False
        # Seal what this run wrote, once per build (as Milvus advises after a bulk load): Milvus builds the HNSW
        # and BM25 indexes of sealed segments, while growing ones are searched by scanning.
        self._retry(lambda: self.client.flush(self.name), [])
        row = {"id": 0, "epoch": self.epoch + 1, "chunks": total, "vector": [1.0, 0.0]}
        self._retry(lambda: self.client.upsert(self.state, [row]), [])  # the one write that switches readers
        self.committed = True
        return fields, True

    def cleanup(self) -> None:
        """Delete what the commit superseded. A failure here only leaves old versions that searches show beside
        the new ones until the next run removes them: a warning, not an error (the build is committed)."""
        e = self.epoch
        deletes: list[tuple[str, list[str]]] = [(f"added <= {e}", [])] if self.fresh else []
        for i in range(0, len(self.drop), DELETE_FILES):
            files = self.drop[i : i + DELETE_FILES]
            deletes.append((f"added <= {e} and file in [{', '.join(map(_quote, files))}]", files))
        deletes += [(f"file == {_quote(f)} and added == {a}", [f]) for f, a in self.stale]
        try:
            for expr, files in deletes:
                self._retry(lambda expr=expr: self.client.delete(self.name, filter=expr), files)
        except Phi3FastError as err:
            self.warn(f"{err} (deleting old chunk versions; the next `phi3fast index` retries)")

    def abort(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.committed:
            return  # the build is visible: nothing to undo
        try:  # best effort: invisible rows; the next run removes them anyway
            self.client.delete(self.name, filter=f"added > {self.epoch}")
        except Exception:  # noqa: BLE001, S110
            pass


def _quote(s: str) -> str:
    """A Milvus expression string literal."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
