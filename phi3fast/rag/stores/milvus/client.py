"""The Milvus client side of the store: connecting, the collections' schemas, ids and the epoch filter."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
from pathlib import Path

from phi3fast.errors import Phi3FastError
from phi3fast.rag.stores.vectors import EF_CONSTRUCTION, M

MAX_TEXT = 65_535  # Milvus VARCHAR limit, in bytes
ROW_FIELDS = [
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


def visible(epoch: int) -> str:
    """The rows of the committed build `epoch`: written by it or before, not superseded by it or before."""
    return f"added <= {epoch} and removed > {epoch}"


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


def pymilvus_module():
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


def one_line(e: BaseException) -> str:
    msg = getattr(e, "message", None) or str(e)
    return " ".join(str(msg).split())


def connect(cfg: dict):  # -> pymilvus.MilvusClient (imported lazily)
    pymilvus = pymilvus_module()
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
        why = one_line(e)
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


def chunk_schema(client, dim: int):
    pm = pymilvus_module()
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


def state_schema(client):
    DataType = pymilvus_module().DataType
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("epoch", DataType.INT64)
    schema.add_field("chunks", DataType.INT64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus wants a vector field in a collection
    params = client.prepare_index_params()
    params.add_index("vector", index_type="FLAT", metric_type="L2")
    return schema, params


def vector_dim(client, name: str) -> int:
    """The collection's vector dimension, after checking it has every field this phi3fast reads and writes."""
    fields = {f["name"]: f for f in client.describe_collection(name)["fields"]}
    missing = [f for f in ROW_FIELDS if f not in fields]
    if missing:
        raise Phi3FastError(
            f"Milvus collection {name} has no field '{missing[0]}': not a phi3fast index of this version "
            "(index into a new --out)"
        )
    return int(fields["vector"]["params"]["dim"])


def read_state(client, state: str) -> tuple[int, int]:
    rows = client.get(state, ids=[0], output_fields=["epoch", "chunks"])
    return (int(rows[0]["epoch"]), int(rows[0]["chunks"])) if rows else (0, 0)
