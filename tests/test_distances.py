"""The SIMD distance kernels in csrc/hnsw/distances.h against numpy, on every SIMD level this CPU supports."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from phi3fast import _hnsw

LEVELS = _hnsw.supported_simd_levels()
DIMS = [1, 7, 15, 16, 17, 31, 33, 384, 1000]


def _rtol(dim: int) -> float:
    # float32 summation in a different order than numpy's pairwise sum: error grows ~ sqrt(dim) * eps
    return 1e-5 * max(1.0, np.sqrt(dim))


def test_levels_are_ordered_and_detected() -> None:
    assert LEVELS[0] == "scalar"
    assert _hnsw.simd_level() == LEVELS[-1]
    assert set(LEVELS) <= {"scalar", "avx2", "avx512"}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dim", DIMS)
def test_pair_distances_match_numpy(level: str, dim: int) -> None:
    rng = np.random.default_rng(dim)
    a = rng.standard_normal(dim).astype(np.float32)
    b = rng.standard_normal(dim).astype(np.float32)
    l2_ref = float(np.sum((a.astype(np.float64) - b) ** 2))
    ip_ref = float(np.dot(a.astype(np.float64), b))
    assert _hnsw.l2_sq(a, b, level) == pytest.approx(l2_ref, rel=_rtol(dim), abs=1e-6)
    assert _hnsw.inner_product(a, b, level) == pytest.approx(ip_ref, rel=_rtol(dim), abs=1e-5)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dim", [1, 7, 384, 1000])
def test_pairwise_matches_numpy(level: str, dim: int) -> None:
    rng = np.random.default_rng(7)
    q = rng.standard_normal((5, dim)).astype(np.float32)
    x = rng.standard_normal((13, dim)).astype(np.float32)
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    l2_ref = ((q64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    ip_ref = q64 @ x64.T
    l2 = _hnsw.pairwise(q, x, "l2", level)
    ip = _hnsw.pairwise(q, x, "ip", level)
    assert l2.dtype == np.float32 and l2.shape == (5, 13)
    np.testing.assert_allclose(l2, l2_ref, rtol=_rtol(dim), atol=1e-5)
    np.testing.assert_allclose(ip, ip_ref, rtol=_rtol(dim), atol=1e-4)


def test_tail_lanes_are_not_read() -> None:
    # A view of the first 17 elements of a buffer whose 18th element is huge: a tail that reads past the end
    # of the vector would pick it up.
    buf = np.ones(64, dtype=np.float32)
    buf[17:] = 1e30
    zeros = np.zeros(17, dtype=np.float32)
    for level in LEVELS:
        assert _hnsw.l2_sq(buf[:17], zeros, level) == pytest.approx(17.0)
        assert _hnsw.inner_product(buf[:17], buf[:17], level) == pytest.approx(17.0)


def test_float64_is_converted() -> None:
    a = np.arange(7, dtype=np.float64)
    assert _hnsw.l2_sq(a, np.zeros(7)) == pytest.approx(float((a**2).sum()))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="dimension mismatch"):
        _hnsw.l2_sq(np.zeros(3, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="1-D"):
        _hnsw.inner_product(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32))
    with pytest.raises(TypeError, match="real numeric"):
        _hnsw.l2_sq(np.zeros(3, np.complex64), np.zeros(3, np.complex64))
    with pytest.raises(ValueError, match="unknown SIMD level"):
        _hnsw.l2_sq(np.zeros(3, np.float32), np.zeros(3, np.float32), "sse9")
    with pytest.raises(ValueError, match="metric"):
        _hnsw.pairwise(np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32), "cosine")


def test_env_cap_and_unsupported_level_is_an_error_not_a_crash() -> None:
    # PHI3FAST_SIMD caps the detected level, as on an older CPU: asking for more must raise, not crash.
    code = (
        "import numpy as np; from phi3fast import _hnsw\n"
        "assert _hnsw.simd_level() == 'scalar', _hnsw.simd_level()\n"
        "assert _hnsw.l2_sq(np.ones(9, np.float32), np.zeros(9, np.float32)) == 9.0\n"
        "try:\n    _hnsw.l2_sq(np.zeros(3, np.float32), np.zeros(3, np.float32), 'avx2')\n"
        "except ValueError as e:\n    assert 'not supported by this CPU' in str(e)\n"
        "else:\n    raise SystemExit('no error')\n"
    )
    env = {**os.environ, "PHI3FAST_SIMD": "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
