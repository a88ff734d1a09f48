"""hnswlib import paths, with hnswlib 0.8 itself as the oracle: Index(params) / Index(hnswlib_index), hnswlib
pickles without hnswlib, BFIndex files written by hnswlib, and every malformed dict or file as a clear error."""

from __future__ import annotations

import copy
import io
import pickle
import struct
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
import pytest

from phi3fast import _hnsw, hnsw
from phi3fast.errors import Phi3FastError
from phi3fast.hnsw import hnswlib_format as compat

# One tolerance table: same graph and same vectors, so distances differ only by SIMD summation order (and, for
# a cosine BFIndex, by re-normalizing hnswlib's already unit vectors).
DIST_TOL = {"rtol": 1e-5, "atol": 1e-6}
N, CAP, M, EF = 1500, 1700, 12, 40
DELETED = (3, 300, 1201)  # labels are 2 * position + 5


def vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def hnswlib_index(space: str, dim: int) -> hnswlib.Index:
    """An hnswlib index with upper levels, deletions and one replaced slot (so labels moved inside the graph)."""
    ix = hnswlib.Index(space, dim)
    ix.init_index(CAP, M=M, ef_construction=60, allow_replace_deleted=True)
    ix.set_num_threads(1)
    ix.add_items(vectors(N, dim), np.arange(N) * 2 + 5)
    for k in DELETED:
        ix.mark_deleted(2 * k + 5)
    ix.mark_deleted(7)
    ix.add_items(vectors(1, dim, seed=9), [10**12], replace_deleted=True)  # takes the slot of label 7
    ix.set_ef(EF)
    return ix


def assert_same_index(ours: hnsw.Index, theirs: hnswlib.Index, dim: int) -> None:
    assert isinstance(ours, hnsw.Index) and isinstance(ours, _hnsw.Index)
    assert (ours.dim, ours.space, ours.ef, ours.num_threads, ours.M, ours.ef_construction) == (
        theirs.dim,
        theirs.space,
        theirs.ef,
        theirs.num_threads,
        theirs.M,
        theirs.ef_construction,
    )
    assert (ours.get_max_elements(), ours.get_current_count()) == (
        theirs.get_max_elements(),
        theirs.element_count,
    )
    assert sorted(ours.get_ids_list()) == sorted(theirs.get_ids_list())
    q = vectors(60, dim, seed=5)
    (l1, d1), (l2, d2) = ours.knn_query(q, k=9), theirs.knn_query(q, k=9)
    np.testing.assert_array_equal(l1, l2)  # same graph, same ef: same answers
    np.testing.assert_allclose(d1, d2, **DIST_TOL)
    live = [10**12, 5, 2 * 1499 + 5]
    np.testing.assert_array_equal(ours.get_items(live), np.asarray(theirs.get_items(live)))
    for k in DELETED:  # deletion marks kept: never returned, not readable
        assert not np.isin(l1, 2 * k + 5).any()
        with pytest.raises(RuntimeError, match="Label not found"):
            ours.get_items([2 * k + 5])


# ---- Index(params), Index(hnswlib_index) ----
@pytest.mark.parametrize("dim", [16, 37])
@pytest.mark.parametrize("space", ["l2", "ip", "cosine"])
def test_params_dict_imports_hnswlib_index(space: str, dim: int) -> None:
    theirs = hnswlib_index(space, dim)
    state = theirs.__getstate__()
    for ours in (
        hnsw.Index(state),  # (params,), what __getstate__ returns
        hnsw.Index(state[0]),  # the params dict itself
        hnsw.Index(params=state[0]),
        hnsw.Index(theirs),  # a live hnswlib index
        hnsw.Index(index=theirs),
    ):
        assert_same_index(ours, theirs, dim)
    # it is now an ordinary phi3fast index: auto ids continue at hnswlib's count (N is new, N + 1 = 2 * 748 + 5
    # exists and is updated), and a deleted slot is reused since hnswlib's index allowed replacement
    ours.add_items(vectors(2, dim, seed=11))
    assert ours.get_current_count() == N + 1
    want = vectors(2, dim, seed=11)[:1]
    np.testing.assert_allclose(
        ours.get_items([N]), want / np.linalg.norm(want) if space == "cosine" else want, **DIST_TOL
    )
    ours.add_items(vectors(1, dim, seed=12), [10**13], replace_deleted=True)
    assert ours.get_current_count() == N + 1


@pytest.mark.parametrize("n", [0, 1, 17, 700])
def test_converted_bytes_are_hnswlib_save_index_bytes(tmp_path: Path, n: int) -> None:
    theirs = hnswlib.Index("l2", 16)
    theirs.init_index(max(n, 1) + 3, M=5, ef_construction=30)
    if n:
        theirs.add_items(vectors(n, 16), np.arange(n) + 1000)
    if n > 1:
        theirs.mark_deleted(1000 + n // 2)
    theirs.save_index(str(tmp_path / "h.bin"))
    assert compat.parse_params(theirs.__getstate__()).index_file == (tmp_path / "h.bin").read_bytes()
    ours = hnsw.Index(theirs.__getstate__())
    assert ours.element_count == n
    if n:
        np.testing.assert_array_equal(
            ours.knn_query(vectors(5, 16, 1), k=1)[0], theirs.knn_query(vectors(5, 16, 1))[0]
        )


def test_uninitialized_params() -> None:
    theirs = hnswlib.Index("cosine", 7)
    theirs.set_ef(33)
    theirs.set_num_threads(1)
    ours = hnsw.Index(theirs.__getstate__())
    assert (ours.space, ours.dim, ours.ef, ours.num_threads, ours.element_count) == ("cosine", 7, 33, 1, 0)
    with pytest.raises(RuntimeError, match="not initialized"):
        ours.get_current_count()
    ours.init_index(10)
    ours.add_items(vectors(3, 7))
    assert ours.get_current_count() == 3


# ---- pickles ----
def test_hnswlib_pickle_loads_without_hnswlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    theirs = hnswlib_index("cosine", 16)
    mine = hnsw.Index(theirs)
    blob = pickle.dumps({"main": theirs, "more": [theirs, 3], "mine": mine, "mine0": pickle.dumps(mine, 0)})
    (tmp_path / "ix.pkl").write_bytes(blob)
    monkeypatch.setitem(sys.modules, "hnswlib", None)  # any import of hnswlib now fails
    for loaded in (hnsw.load_hnswlib_pickle(tmp_path / "ix.pkl"), hnsw.load_hnswlib_pickle(io.BytesIO(blob))):
        assert loaded["more"][1] == 3
        assert_same_index(loaded["main"], theirs, 16)
        assert_same_index(loaded["more"][0], theirs, 16)
        assert_same_index(loaded["mine"], theirs, 16)
        assert_same_index(hnsw.load_hnswlib_pickle(io.BytesIO(loaded["mine0"])), theirs, 16)


def test_hnswlib_pickle_refuses_other_globals() -> None:
    for obj in (OrderedDict(a=1), print, Path("x")):
        with pytest.raises(TypeError, match="may not reference") as e:
            hnsw.load_hnswlib_pickle(io.BytesIO(pickle.dumps(obj)))
        assert isinstance(e.value, Phi3FastError)


@pytest.mark.parametrize(
    "protocol", [0, 1, 2, 5]
)  # 0 and 1 aborted the process before the engine classes defined __reduce_ex__
def test_own_pickles_and_copies_keep_the_class(protocol: int) -> None:
    ix = hnsw.Index("ip", 37)
    ix.init_index(300, M=8, storage="int8")
    ix.add_items(vectors(250, 37))
    ix.mark_deleted(4)
    ix.set_ef(25)
    q = vectors(10, 37, seed=3)
    copies = (copy.deepcopy(ix), copy.copy(ix), hnsw.Index(ix), hnsw.Index(ix.__getstate__()))
    for back in (pickle.loads(pickle.dumps(ix, protocol)), *copies):
        assert type(back) is hnsw.Index
        assert (back.ef, back.storage, back.get_current_count()) == (25, "int8", 250)
        assert repr(back) == "<phi3fast.hnsw.Index(space='ip', dim=37, storage='int8')>"
        np.testing.assert_array_equal(back.knn_query(q, k=5)[0], ix.knn_query(q, k=5)[0])
    empty = pickle.loads(pickle.dumps(hnsw.Index("l2", 3), protocol))
    assert type(empty) is hnsw.Index and empty.dim == 3
    bf = hnsw.BFIndex("l2", 5)
    bf.init_index(4)
    bf.add_items(vectors(4, 5))
    bf2 = pickle.loads(pickle.dumps(bf, protocol))
    assert type(bf2) is hnsw.BFIndex
    np.testing.assert_array_equal(bf2.knn_query(q[:, :5], k=2)[0], bf.knn_query(q[:, :5], k=2)[0])


def test_engine_classes_pickle_at_every_protocol() -> None:
    # The C++ classes themselves (phi3fast._hnsw): protocols 0 and 1 used to abort the interpreter, so the check
    # runs in a child process, where a regression shows as a failed exit instead of killing the test run.
    code = """
import pickle, numpy as np
from phi3fast import _hnsw
for cls in (_hnsw.Index, _hnsw.BFIndex):
    ix = cls("l2", 6)
    ix.init_index(20)
    ix.add_items(np.arange(60, dtype=np.float32).reshape(10, 6))
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(ix, protocol))
        assert type(back) is cls and back.get_current_count() == 10, (cls, protocol)
        assert (back.knn_query(np.ones((1, 6), np.float32), k=3)[0] == ix.knn_query(np.ones((1, 6), np.float32), k=3)[0]).all()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---- bad dicts: a clear error naming the field, never a crash ----
def _labels_swapped(d: dict[str, Any]) -> None:
    d["label_lookup_external"] = d["label_lookup_external"].copy()
    d["label_lookup_external"][[0, 1]] = d["label_lookup_external"][[1, 0]]


def _bad_link(d: dict[str, Any]) -> None:
    level0 = d["data_level0"].copy()
    size = d["size_data_per_element"]
    level0[5 * size + 4 : 5 * size + 8] = np.frombuffer(
        struct.pack("<I", 10**6), np.int8
    )  # element 5, link 1
    d["data_level0"] = level0


BAD_PARAMS = [
    ("ser_version 2", lambda d: d.update(ser_version=2), "ser_version 2 is not supported"),
    ("no data_level0", lambda d: d.pop("data_level0"), "missing key 'data_level0'"),
    ("no M", lambda d: d.pop("M"), "missing key 'M'"),
    ("no space", lambda d: d.pop("space"), "missing key 'space'"),
    ("space", lambda d: d.update(space="hamming"), "space 'hamming' is not one of"),
    ("dim", lambda d: d.update(dim=17), "'label_offset' = .*expected .* dim=17"),
    ("M", lambda d: d.update(M=13), "'max_M' = 12, expected 13"),
    ("normalize", lambda d: d.update(normalize=True), "'normalize' = True contradicts space 'l2'"),
    ("inited", lambda d: d.update(index_inited="yes"), "'index_inited' must be a bool"),
    ("mult", lambda d: d.update(mult="x"), "'mult' must be a number"),
    ("ef", lambda d: d.update(ef=-1), "'ef' = -1 is out of range"),
    ("count", lambda d: d.update(cur_element_count=CAP + 1), "'cur_element_count' = 1701 is out of range"),
    ("level0 short", lambda d: d.update(data_level0=d["data_level0"][:-1]), "'data_level0' has .* expected"),
    ("level0 float", lambda d: d.update(data_level0=d["data_level0"].astype(np.float32)), "1-byte integers"),
    ("links short", lambda d: d.update(link_lists=d["link_lists"][:-4]), "'link_lists' has"),
    (
        "levels short",
        lambda d: d.update(element_levels=d["element_levels"][:10]),
        "fewer than cur_element_count",
    ),
    ("negative level", lambda d: d["element_levels"].__setitem__(2, -1), "level out of range"),
    ("labels", _labels_swapped, "disagree with the labels in 'data_level0'"),
    ("entry", lambda d: d.update(enterpoint_node=CAP + 5), "entry point"),
    ("link", _bad_link, "hnswlib params: element 5 links to a missing element"),
]


@pytest.mark.parametrize("mutate,match", [p[1:] for p in BAD_PARAMS], ids=[p[0] for p in BAD_PARAMS])
def test_bad_params_raise(mutate: Any, match: str) -> None:
    theirs = hnswlib_index("l2", 16)
    d = dict(theirs.__getstate__()[0])
    d["element_levels"] = d["element_levels"].copy()
    mutate(d)
    with pytest.raises(RuntimeError, match=match) as e:
        hnsw.Index(d)
    assert isinstance(e.value, Phi3FastError) and "/tmp" not in str(e.value)


def test_bad_constructor_arguments_raise() -> None:
    state = hnswlib.Index("l2", 4).__getstate__()
    for args, kwargs in (((), {}), (("l2",), {}), ((state, 4), {}), ((), {"params": state, "space": "l2"})):
        with pytest.raises(TypeError):
            hnsw.Index(*args, **kwargs)
    with pytest.raises(TypeError, match="expected a phi3fast or hnswlib Index, got list"):
        hnsw.Index([1, 2])
    with pytest.raises(TypeError, match="expected hnswlib's params dict, got int"):
        hnsw.Index(params=3)
    with pytest.raises(RuntimeError, match="Unpickle Error: unsupported state"):  # neither hnswlib's nor ours
        hnsw.Index((2, "l2"))


# ---- BFIndex files written by hnswlib ----
@pytest.mark.parametrize("dim", [16, 37])
@pytest.mark.parametrize("space", ["l2", "ip", "cosine"])
def test_bfindex_loads_hnswlib_files(tmp_path: Path, space: str, dim: int) -> None:
    theirs = hnswlib.BFIndex(space, dim)
    theirs.init_index(130)
    theirs.add_items(vectors(117, dim), np.arange(117) * 7 + 1)
    for label in (1, 7 * 50 + 1, 7 * 116 + 1):  # the last vector moves into each hole
        theirs.delete_vector(label)
    theirs.save_index(str(tmp_path / "bf.bin"))
    ours = hnsw.BFIndex(space, dim)
    ours.init_index(5)  # load_index replaces an initialized index, as in hnswlib
    ours.add_items(vectors(5, dim, seed=8))
    ours.load_index(str(tmp_path / "bf.bin"))
    assert (ours.get_current_count(), ours.get_max_elements()) == (114, 130)
    q = vectors(20, dim, seed=2)
    q /= np.linalg.norm(
        q, axis=1, keepdims=True
    )  # hnswlib's BFIndex does not normalize cosine queries itself
    (l1, d1), (l2, d2) = ours.knn_query(q, k=10), theirs.knn_query(q, k=10)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_allclose(d1, d2, **DIST_TOL)
    ours.delete_vector(7 * 3 + 1)  # a phi3fast BFIndex now: deletes, grows, saves in our format
    ours.add_items(vectors(2, dim, seed=4), [5, 6])
    ours.save_index(str(tmp_path / "ours.bin"))
    again = hnsw.BFIndex(space, dim)
    again.load_index(str(tmp_path / "ours.bin"), max_elements=500)
    assert (again.get_current_count(), again.get_max_elements()) == (115, 500)
    np.testing.assert_array_equal(again.knn_query(q, k=10)[0], ours.knn_query(q, k=10)[0])


def test_bfindex_loads_empty_hnswlib_file(tmp_path: Path) -> None:
    theirs = hnswlib.BFIndex("l2", 3)
    theirs.init_index(4)
    theirs.save_index(str(tmp_path / "bf.bin"))
    ours = hnsw.BFIndex("l2", 3)
    ours.load_index(str(tmp_path / "bf.bin"), max_elements=9)
    assert (ours.get_current_count(), ours.get_max_elements()) == (0, 9)


def test_bad_hnswlib_bfindex_files_raise(tmp_path: Path) -> None:
    theirs = hnswlib.BFIndex("l2", 16)
    theirs.init_index(20)
    theirs.add_items(vectors(12, 16), np.arange(12))
    theirs.save_index(str(tmp_path / "bf.bin"))
    blob = (tmp_path / "bf.bin").read_bytes()
    per = 16 * 4 + 8

    def load(b: bytes, dim: int = 16) -> None:
        (tmp_path / "x.bin").write_bytes(b)
        hnsw.BFIndex("l2", dim).load_index(str(tmp_path / "x.bin"))

    cases = [
        (blob[:10], "too short"),
        (blob[:-1], "does not match its header"),
        (blob + b"\0", "does not match its header"),
        (struct.pack("<QQQ", 2**62, per, 1) + blob[24:], "does not match its header"),  # no huge allocation
        (struct.pack("<QQQ", 20, per, 21) + blob[24:], "does not match its header"),  # count > capacity
        (blob[:24] + blob[24 : 24 + per] * 2 + blob[24 + 2 * per :], "a label appears twice"),
        (blob[:24] + struct.pack("<f", float("nan")) + blob[28:], "NaN"),
    ]
    for bad, match in cases:
        with pytest.raises(RuntimeError, match=f"x.bin.*{match}") as e:
            load(bad)
        assert isinstance(e.value, Phi3FastError)
    with pytest.raises(RuntimeError, match="hnswlib BFIndex file has dim 16, this index has dim 37"):
        load(blob, dim=37)
    with pytest.raises(RuntimeError, match="Cannot open file"):
        hnsw.BFIndex("l2", 16).load_index(str(tmp_path / "missing.bin"))
