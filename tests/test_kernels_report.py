"""The AOT report compiles the kernels for sm_80 and sm_90 offline: no errors, no spills, tensor cores in the
GEMMs. It runs in a subprocess with TRITON_INTERPRET=0 (this process has the interpreter on).

Budget: the full report (every dtype, NF4 format variant and tile config; ~250 compiles) takes minutes on 2
cores, so this test compiles the rows of the default format (bf16 activations, double-quant NF4, blocksize 64)
in every tile config; `python -m phi3fast.kernels.report` runs them all."""

from __future__ import annotations

import pytest
from aot_helpers import compile_report

DEFAULT_FORMAT = r"bf16,dq=1,|nf4_quantize bf16,BLOCKSIZE=64,"
GEMMS = {"nf4_matmul", "nf4_matmul_small_m", "lora_dx"}  # kernels whose main loop is tl.dot


@pytest.mark.slow
def test_aot_report_default_format() -> None:
    rows = compile_report(DEFAULT_FORMAT)
    assert {r["kernel"] for r in rows} >= GEMMS | {"nf4_dequant"}
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        where = f"{r['kernel']} [{r['config']}] {r['arch']}"
        if r["kernel"] in GEMMS:
            assert r["tensor_cores"], f"{where}: no HMMA/HGMMA in the SASS"
        if r["kernel"] == "nf4_dequant":
            assert not r["tensor_cores"], where


def test_report_table_format() -> None:
    """The text table has one header and the columns the issue asks for (no compile needed)."""
    from phi3fast.kernels.report import COLUMNS, Row, format_table

    row = Row("nf4_matmul", "bf16,BLOCK_M=64", "sm_90", 128, 0, 1024, True, "")
    lines = format_table([row]).splitlines()
    assert lines[0].split() == list(COLUMNS) and lines[1].split() == ["nf4_matmul", "bf16,BLOCK_M=64", "sm_90",
                                                                       "128", "0", "1024", "True"]  # fmt: skip
