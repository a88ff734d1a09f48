"""NF4 matmul and LoRA forward+backward: phi3fast.kernels vs bitsandbytes (+ PEFT-style LoRA) vs dense matmul.

    python bench/kernels.py            # CUDA: all Phi-3-mini shapes; CPU: 2 shapes, M in (1, 16)
    python bench/kernels.py --full     # CPU: every shape and M (slow)

Phi-3-mini linear shapes (K, N): qkv (3072, 9216), o (3072, 3072), gate_up (3072, 16384), down (8192, 3072).
Per shape and M, one row per implementation: time, TFLOP/s, GB/s (weight bytes as stored + activations), % of
the device's peak (CUDA: a table of known GPUs), and the speed-up of phi3fast over each peer on the same inputs.
On CUDA: bf16, Triton kernels (and both large-M paths of nf4_matmul, fused vs dequant + cuBLAS, which is the
evidence for the rule in kernels/nf4.py). On CPU: the torch reference path against bitsandbytes' CPU path, in
bf16 by default (--dtype fp32 for fp32). Rows go to bench/results/kernels.json.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, timeit, write_rows  # noqa: E402

SHAPES = [(3072, 9216), (3072, 3072), (3072, 16384), (8192, 3072)]
GPU_M = [1, 16, 512, 4096, 8192]
CPU_M = [1, 16]
CPU_M_FULL = [1, 16, 512, 4096, 8192]
RANK, ALPHA = 16, 32
# Dense bf16 tensor-core TFLOP/s and memory GB/s of known GPUs (datasheets), for "% of peak".
PEAKS = {"H100": (989.0, 3350.0), "A100": (312.0, 2039.0), "L40S": (362.0, 864.0), "L4": (121.0, 300.0),
         "A10": (125.0, 600.0), "RTX 4090": (165.0, 1008.0), "RTX 3090": (71.0, 936.0)}  # fmt: skip


def peak(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAKS.items():
        if key in name:
            return value
    return None, None


def bench(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds per call: CUDA events via triton's do_bench on GPU, perf_counter loops on CPU."""
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100) / 1e3
    return timeit(fn, warmup=1, repeat=3, min_time=0.2)


def cases(m, k, n, w, q, state, w_dense, a, b, dtype, backend):  # noqa: ANN001, ANN201
    """(op, impl, fn, flops, bytes) for one shape and M; phi3fast first, so peers can be compared to it."""
    import bitsandbytes as bnb
    from phi3fast.kernels import lora_linear, nf4, nf4_matmul

    device = a.device
    scale = ALPHA / RANK
    x = torch.randn(m, k, device=device, dtype=dtype)
    xg = x.clone().requires_grad_()
    g = torch.randn(m, n, device=device, dtype=dtype)

    def fwd_bwd(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            xg.grad = a.grad = b.grad = None
            forward().backward(g)

        return run

    def peft_lora(base: torch.Tensor) -> torch.Tensor:
        return base + scale * ((xg @ a.t()) @ b.t())  # what PEFT's LoRA Linear(4bit) forward computes

    def forced(path: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            nf4.LARGE_M_PATH = path
            try:
                return nf4_matmul(x, w)
            finally:
                nf4.LARGE_M_PATH = "measure"

        return run

    mm_flops = 2.0 * m * n * k
    act_bytes = (m * k + m * n) * x.element_size()
    nf4_bytes = w.nbytes + act_bytes
    dense_bytes = n * k * x.element_size() + act_bytes
    dname = str(dtype)[6:]
    out = [("nf4_matmul", "phi3fast", lambda: nf4_matmul(x, w), mm_flops, nf4_bytes)]
    if device.type == "cuda" and m > nf4.SMALL_M:  # both large-M paths: the evidence for the rule in nf4.py
        out += [
            ("nf4_matmul", f"phi3fast[{p}]", forced(p), mm_flops, nf4_bytes) for p in ("fused", "dequant")
        ]
    out.append(("nf4_matmul", "bitsandbytes", lambda: bnb.matmul_4bit(x, q.t(), quant_state=state), mm_flops,
                nf4_bytes))  # fmt: skip
    out.append(("nf4_matmul", f"torch {dname} dense", lambda: x @ w_dense.t(), mm_flops, dense_bytes))
    # LoRA fwd+bwd: x W^T and dY W (W is frozen: no dW) plus six rank-r GEMMs; W is read twice.
    lora_flops = 2 * mm_flops + 2.0 * m * RANK * (k + n) * 3
    lora_bytes = 2 * nf4_bytes + 2 * m * k * x.element_size()
    out.append(("lora_fwd_bwd", "phi3fast", fwd_bwd(lambda: lora_linear(xg, w, a, b, scale, backend=backend)),
                lora_flops, lora_bytes))  # fmt: skip
    out.append(("lora_fwd_bwd", "bnb+peft", fwd_bwd(lambda: peft_lora(bnb.matmul_4bit(xg, q.t(), quant_state=state))),
                lora_flops, lora_bytes))  # fmt: skip
    out.append(("lora_fwd_bwd", f"torch {dname} dense+peft", fwd_bwd(lambda: peft_lora(xg @ w_dense.t())),
                lora_flops, lora_bytes))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="CPU: every shape and M (the CUDA default)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="CPU activation dtype")
    args = parser.parse_args()

    import bitsandbytes.functional as bnbf

    from phi3fast.quant import quantize_nf4

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda or args.dtype == "bf16" else torch.float32
    shapes = SHAPES if cuda or args.full else SHAPES[:2]
    ms = GPU_M if cuda else (CPU_M_FULL if args.full else CPU_M)
    peak_tflops, peak_gbs = peak(device)
    ours = "triton" if cuda else "torch"
    rows, times = [], {}

    for k, n in shapes:
        w_full = torch.randn(n, k, device=device) / k**0.5
        w = quantize_nf4(w_full.to(dtype))
        q, state = bnbf.quantize_4bit(
            w_full.to(dtype), blocksize=64, quant_type="nf4", compress_statistics=True
        )
        w_dense = w_full.to(dtype)
        a = (torch.randn(RANK, k, device=device) / k**0.5).to(dtype).requires_grad_()
        b = (torch.randn(n, RANK, device=device) / RANK**0.5).to(dtype).requires_grad_()
        for m in ms:
            for case in cases(m, k, n, w, q, state, w_dense, a, b, dtype, ours):
                op, impl, fn, flops, nbytes = case
                sec = bench(fn, device)
                times[(op, impl, k, n, m)] = sec
                row = {
                    "op": op, "impl": impl, "K": k, "N": n, "M": m, "dtype": str(dtype)[6:],
                    "ms": sec * 1e3, "TFLOP/s": flops / sec / 1e12, "GB/s": nbytes / sec / 1e9,
                }  # fmt: skip
                if peak_tflops:
                    row["%peak_flops"] = 100 * row["TFLOP/s"] / peak_tflops
                    row["%peak_bw"] = 100 * row["GB/s"] / peak_gbs
                ref = times.get((op, "phi3fast", k, n, m))
                row["phi3fast_speedup"] = ref and sec / ref
                rows.append(row)
                print(f"{op:13s} {impl:26s} K={k:5d} N={n:5d} M={m:5d} {sec * 1e3:9.3f} ms", file=sys.stderr)

    columns = ["op", "impl", "K", "N", "M", "dtype", "ms", "TFLOP/s", "GB/s"]
    columns += ["%peak_flops", "%peak_bw"] if peak_tflops else []
    print_table(rows, columns + ["phi3fast_speedup"])
    print(
        f"phi3fast_speedup = peer time / phi3fast time (>1: phi3fast faster). Rows: {write_rows('kernels', rows)}"
    )


if __name__ == "__main__":
    main()
