"""hnswlib 0.8's serialized forms read into phi3fast.hnsw (pure Python over the public C++ API): params dicts,
pickles and BFIndex files.

- `Index.__getstate__()` / a pickle holds `(params,)`: a dict of header fields plus the graph as numpy arrays.
  `index_file_bytes` lays those out as hnswlib's own `saveIndex` file, which our `load_index` already reads:
  13 header fields `<QQQQQQiIQQQdQ` (offsetLevel0, max_elements, cur_element_count, size_data_per_element,
  label_offset, offsetData, maxlevel, enterpoint_node, maxM, maxM0, M, mult, ef_construction), then the level-0
  blocks of the first cur_element_count elements, then per element a u32 byte count and its upper link lists.
  The dict's `data_level0` is exactly those blocks and `link_lists` the upper lists back to back, so the
  conversion only frames bytes; every size is checked first so a bad dict is a clear error, never a crash.
- `BruteforceSearch::saveIndex` (hnswlib's BFIndex): `<QQQ` (max_elements, size_per_element, cur_element_count),
  then max_elements records of [dim float32 | u64 label]; records past cur_element_count are uninitialized.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from phi3fast._hnsw import SPACES, HnswError, HnswTypeError

SER_VERSION = 1  # the only `ser_version` hnswlib has written (0.6 through 0.8)
HNSW_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
BF_HEADER = struct.Struct("<QQQ")
BF_MAGIC = b"PHI3BFIX"  # our own BFIndex files start with this; hnswlib's start with a u64 capacity
_MAX_LINK_LIST_BYTES = 2**32 - 1  # hnswlib stores each element's upper-list size in a u32


@dataclass(frozen=True)
class HnswlibParams:
    """What a phi3fast.hnsw.Index needs from hnswlib's params dict. `index_file` is None before init_index."""

    space: str
    dim: int
    ef: int
    num_threads: int
    allow_replace_deleted: bool
    index_file: bytes | None


def _fail(why: str) -> HnswError:
    return HnswError(f"Unpickle Error: hnswlib index params: {why}")


def is_hnswlib_state(obj: object) -> bool:
    """True for hnswlib's `Index.__getstate__()` result `(params,)` or a bare params dict."""
    if isinstance(obj, tuple) and len(obj) == 1:
        obj = obj[0]
    return isinstance(obj, Mapping) and "ser_version" in obj


def is_hnswlib_index(obj: object) -> bool:
    """An hnswlib.Index object (checked by type, so hnswlib need not be importable here)."""
    t = type(obj)
    return t.__module__ == "hnswlib" and t.__name__ == "Index" and hasattr(obj, "__getstate__")


def _get(d: Mapping, key: str) -> Any:
    try:
        return d[key]
    except KeyError:
        raise _fail(f"missing key {key!r}") from None


def _int(d: Mapping, key: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    v = _get(d, key)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise _fail(f"{key!r} must be an integer, got {type(v).__name__}")
    if not lo <= int(v) <= hi:
        raise _fail(f"{key!r} = {int(v)} is out of range [{lo}, {hi}]")
    return int(v)


def _bool(d: Mapping, key: str, default: bool | None = None) -> bool:
    if default is not None and key not in d:
        return default
    v = _get(d, key)
    if not isinstance(v, (bool, np.bool_, int, np.integer)) or int(v) not in (0, 1):
        raise _fail(f"{key!r} must be a bool, got {v!r}")
    return bool(v)


def _array(d: Mapping, key: str, kind: str, itemsize: int, size: int | None) -> np.ndarray:
    """A 1-D array of integers of the given kind ('i'/'u', or 'b' for raw bytes of either sign) and size."""
    v = _get(d, key)
    a = np.asarray(v) if not isinstance(v, (bytes, bytearray)) else np.frombuffer(v, np.uint8)
    kinds = "iu" if kind == "b" else kind
    if a.dtype.kind not in kinds or a.dtype.itemsize != itemsize or a.ndim != 1:
        raise _fail(
            f"{key!r} must be a 1-D array of {itemsize}-byte integers, got {a.dtype} with shape {a.shape}"
        )
    if size is not None and a.size != size:
        raise _fail(f"{key!r} has {a.size} entries, expected {size}")
    return a


def parse_params(state: object) -> HnswlibParams:
    """Validate hnswlib's params dict (or its `(params,)` state tuple) and build the equivalent index file."""
    if isinstance(state, tuple) and len(state) == 1:
        state = state[0]
    if not isinstance(state, Mapping):
        raise HnswTypeError(f"Unpickle Error: expected hnswlib's params dict, got {type(state).__name__}")
    d = state
    ver = _get(d, "ser_version")
    if ver != SER_VERSION:
        raise _fail(f"ser_version {ver!r} is not supported (hnswlib 0.8 writes {SER_VERSION})")
    space = _get(d, "space")
    if space not in SPACES:
        raise _fail(f"space {space!r} is not one of {', '.join(SPACES)}")
    dim = _int(d, "dim", 1, 2**31 - 1)
    if "normalize" in d and _bool(d, "normalize") != (space == "cosine"):
        raise _fail(f"'normalize' = {d['normalize']!r} contradicts space {space!r}")
    ef = _int(d, "ef")
    num_threads = _int(d, "num_threads", -(2**31), 2**31 - 1)
    if not _bool(d, "index_inited"):
        return HnswlibParams(space, dim, ef, num_threads, False, None)
    allow_replace = _bool(d, "allow_replace_deleted", default=False)  # absent before hnswlib 0.7
    return HnswlibParams(space, dim, ef, num_threads, allow_replace, index_file_bytes(d, dim))


def index_file_bytes(d: Mapping, dim: int) -> bytes:
    """hnswlib's `saveIndex` bytes for an initialized index's params dict (sizes checked before any copy)."""
    M = _int(d, "M", 2, 10000)  # phi3fast's loader range; hnswlib's own mult = 1/ln(M) needs M >= 2
    links = 4 * (M + 1)  # size_links_per_element: a u32 header, then maxM u32 neighbour ids
    expect = {
        "offset_level0": 0,
        "max_M": M,
        "max_M0": 2 * M,
        "size_links_per_element": links,
        "offset_data": 4 * (2 * M + 1),
        "label_offset": 4 * (2 * M + 1) + 4 * dim,
        "size_data_per_element": 4 * (2 * M + 1) + 4 * dim + 8,
    }
    for key, want in expect.items():
        got = _int(d, key)
        if got != want:
            raise _fail(f"{key!r} = {got}, expected {want} for M={M} and dim={dim} (float32 vectors)")
    size_data = expect["size_data_per_element"]
    max_elements = _int(d, "max_elements", 0, 0xFFFFFFF0)
    n = _int(d, "cur_element_count", 0, max_elements)
    efc = _int(d, "ef_construction", 0, 2**32)
    mult = d.get(
        "mult", 1.0 / math.log(M)
    )  # ignored by the loader (it derives mult from M), kept for fidelity
    if isinstance(mult, (bool, np.bool_)) or not isinstance(mult, (int, float, np.integer, np.floating)):
        raise _fail(f"'mult' must be a number, got {type(mult).__name__}")
    level0 = _array(d, "data_level0", "b", 1, n * size_data)
    levels = _array(d, "element_levels", "i", 4, None)
    if levels.size < n:
        raise _fail(f"'element_levels' has {levels.size} entries, fewer than cur_element_count = {n}")
    levels = levels[:n].astype(np.int64)
    if n and (levels.min() < 0 or levels.max() * links > _MAX_LINK_LIST_BYTES):
        raise _fail(f"'element_levels' holds a level out of range ({int(levels.min())}..{int(levels.max())})")
    upper = _array(d, "link_lists", "b", 1, int(levels.sum()) * links)
    external = _array(d, "label_lookup_external", "u", 8, n)
    internal = _array(d, "label_lookup_internal", "u", 4, n)
    # The lookup table must agree with the labels stored in the level-0 blocks (our loader reads those).
    stored = (
        level0.view(np.uint8).reshape(n, size_data)[:, expect["label_offset"] :].copy().view("<u8").ravel()
    )
    if n and (internal.max() >= n or not np.array_equal(stored[internal.astype(np.int64)], external)):
        raise _fail(
            "'label_lookup_external'/'label_lookup_internal' disagree with the labels in 'data_level0'"
        )
    max_level = _int(d, "max_level", -1, 63)
    entry = _int(d, "enterpoint_node", 0, 2**32 - 1)
    if n and (entry >= n or max_level != levels[entry]):
        raise _fail(f"entry point {entry} at level {max_level} does not match element_levels")
    head = HNSW_HEADER.pack(0, max_elements, n, size_data, expect["label_offset"], expect["offset_data"],
                            max_level, entry, M, 2 * M, M, float(mult), efc)  # fmt: skip
    # Per element: a u32 byte count, then its upper link lists. Laid out with numpy (no per-element Python):
    # the count fields sit at 4*i + (bytes of lists before i); every other tail byte is `upper`, in order.
    sizes = (levels * links).astype("<u4")
    at = 4 * np.arange(n) + np.cumsum(sizes, dtype=np.int64) - sizes
    tail = np.empty(4 * n + upper.size, np.uint8)
    is_count = np.zeros(tail.size, bool)
    is_count[(at[:, None] + np.arange(4)).ravel()] = True
    tail[is_count] = sizes.view(np.uint8)
    tail[~is_count] = upper.view(np.uint8)
    return b"".join((head, level0.tobytes(), tail.tobytes()))


def read_bf_file(path: str, dim: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(vectors float32 [n, dim], labels uint64 [n], capacity) from an hnswlib BFIndex file, all sizes checked."""
    size = os.path.getsize(path)
    bad = f"Index seems to be corrupted or unsupported: {path}: not a phi3fast BFIndex file (bad magic), and "
    with open(path, "rb") as f:
        head = f.read(BF_HEADER.size)
        if len(head) < BF_HEADER.size:
            raise HnswError(f"{bad}too short ({size} bytes) for an hnswlib BFIndex header")
        cap, per, n = BF_HEADER.unpack(head)
        # Python ints do not overflow, so this exact size check is safe against garbage headers.
        if per < 12 or per % 4 != 0 or n > cap or size != BF_HEADER.size + cap * per:
            raise HnswError(
                f"{bad}not a valid hnswlib BFIndex file: size {size} bytes does not match its header "
                f"({cap} slots of {per} bytes, {n} used)"
            )
        if per != 4 * dim + 8:
            raise HnswError(
                f"Index seems to be corrupted or unsupported: {path}: hnswlib BFIndex file has dim "
                f"{(per - 8) // 4}, this index has dim {dim}"
            )
        rec = np.frombuffer(f.read(n * per), np.uint8).reshape(n, per)
    vectors = rec[:, : 4 * dim].copy().view("<f4")
    labels = rec[:, 4 * dim :].copy().view("<u8").ravel()
    if np.unique(labels).size != n:
        raise HnswError(f"Index seems to be corrupted or unsupported: {path}: a label appears twice")
    return vectors, labels, cap


# What an hnswlib pickle may reference: the Index class and numpy's array reconstruction (numpy 1.x and 2.x);
# phi3fast's own index classes are accepted too, so one loader serves a mix of old and migrated objects.
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # protocol 0/1 pickles of phi3fast indexes (named copy_reg there); it only calls a class allowed here
    ("copyreg", "__newobj__"),
    ("copy_reg", "__newobj__"),
    ("_codecs", "encode"),  # how protocols 0/1 spell a bytes object: a pure str -> bytes function
    ("phi3fast.hnsw", "Index"),
    ("phi3fast.hnsw", "BFIndex"),
}


class HnswlibUnpickler(pickle.Unpickler):
    """Loads pickles of hnswlib.Index objects (alone or in lists/dicts/tuples) as `index_cls` (phi3fast.hnsw.Index),
    with no hnswlib installed. Only those classes and numpy arrays may appear: any other global is refused, so
    this also never runs code a foreign pickle names."""

    def __init__(self, file: IO[bytes], index_cls: type) -> None:
        super().__init__(file)
        self._index_cls = index_cls

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("hnswlib", "Index"):
            return self._index_cls
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise HnswTypeError(f"Unpickle Error: an hnswlib pickle may not reference {module}.{name}")


def load_pickle(file: IO[bytes], index_cls: type) -> Any:
    return HnswlibUnpickler(file, index_cls).load()
