"""What the compiled GPU code does, read from the AOT compile (sm_80, no GPU needed): the GEMMs' row offsets are
64-bit, and the double-quant scale rounds its product before adding the offset, as bitsandbytes does.

Each test compiles a few specs in a subprocess with TRITON_INTERPRET=0 (this process has the interpreter on)."""

from __future__ import annotations

import re

import pytest
from aot_helpers import compile_asm

# One tile config per GEMM is enough: the offset arithmetic does not depend on the tile.
ROW_STRIDES = {
    "nf4_matmul": ("stride_xm", "stride_tm", "stride_om"),
    "lora_dx": ("stride_gm", "stride_um", "stride_dxm"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kernel", sorted(ROW_STRIDES))
def test_gemm_row_offsets_are_64_bit(kernel: str) -> None:
    """`rm * stride` passes 2^31 at ~60k rows: every row stride is widened to i64 and multiplied in i64."""
    (row,) = compile_asm(rf"^{kernel} bf16,dq=1,lora=1,BLOCK_M=64,BLOCK_N=64,", "ttgir")
    ttgir = row["ttgir"]
    for stride in ROW_STRIDES[kernel]:
        assert re.search(rf"arith\.extsi %{stride} : i32 to i64", ttgir), f"{kernel}: {stride} stays 32-bit"
    assert re.search(r"arith\.muli .*: tensor<64x1xi64", ttgir), f"{kernel}: no 64-bit row offset product"


@pytest.mark.slow
def test_double_quant_scale_rounds_twice() -> None:
    """nested_code[q] * nested_absmax + offset: bitsandbytes rounds the product, then the sum. The product must be
    an explicitly rounded mul (never contracted) and no fused multiply-add may appear, in PTX or in SASS.

    The dequant kernel's only float arithmetic is the scale and code * scale, so any FMA would be the fused scale;
    in the GEMMs without the LoRA epilogue (whose scale * up may fuse, harmlessly), likewise."""
    match = r"^nf4_dequant bf16,dq=1,|^nf4_matmul(_small_m)? bf16,dq=1,lora=0,BLOCK_M=64,BLOCK_N=64,|" \
            r"^nf4_matmul_small_m bf16,dq=1,lora=0,BLOCK_N=32,BLOCK_K=64"  # fmt: skip
    ptx_rows = compile_asm(match, "ptx")
    sass_rows = compile_asm(match, "sass")
    assert {r["kernel"] for r in ptx_rows} == {"nf4_dequant", "nf4_matmul", "nf4_matmul_small_m"}
    for ptx, sass in zip(ptx_rows, sass_rows, strict=True):
        where = f"{ptx['kernel']} [{ptx['config']}]"
        assert "mul.rn.f32" in ptx["ptx"], f"{where}: the scale's product is not an explicitly rounded mul"
        assert not re.search(r"\bfma\.rn\.f32\b", ptx["ptx"]), f"{where}: fused multiply-add in the PTX"
        assert not re.search(r"\bFFMA\b", sass["sass"]), f"{where}: FFMA in the SASS"
