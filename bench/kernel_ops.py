"""NF4 matmul and LoRA forward+backward: phi3fast.kernels vs bitsandbytes (+ PEFT-style LoRA) vs dense matmul.

(Named kernel_ops.py, not kernels.py: a script's folder comes first on sys.path, and bitsandbytes imports a
package called `kernels`, which a bench/kernels.py would shadow for every bench script.)

    python bench/kernel_ops.py            # CUDA: all Phi-3-mini shapes; CPU: 2 shapes, M in (1, 16)
    python bench/kernel_ops.py --full     # CPU: every shape and M (slow)

Phi-3-mini linear shapes (K, N): qkv (3072, 9216), o (3072, 3072), gate_up (3072, 16384), down (8192, 3072).
Per shape and M, one row per implementation: time, TFLOP/s, GB/s (weight bytes as stored + activations), % of
the device's peak (CUDA: a table of known GPUs), and the speed-up of phi3fast over each peer on the same inputs.
On CUDA: bf16, Triton kernels (and both large-M paths of nf4_matmul, fused vs dequant + cuBLAS, which is the
evidence for the rule in kernels/nf4.py). On CPU: the torch reference path against bitsandbytes' CPU path, in
bf16 by default (--dtype fp32 for fp32). Rows go to bench/results/kernels.json.

Fused row-wise kernels, CUDA only: rms_norm, rope_qkv_, swiglu and fused_linear_cross_entropy against
Liger-Kernel's equivalents (LigerRMSNormFunction 'llama' casting = our RMSNorm's, LigerRopeFunction on q/k views
of the fused qkv with full-width cos/sin, LigerSiLUMulFunction on the gate/up halves and
LigerFusedGateUpSiLUMulFunction on the fused gate_up, LigerFusedLinearCrossEntropyFunction) and eager torch, at
Phi-3-mini sizes, forward + backward, bf16: time, GB/s of the minimal traffic and % of the bandwidth peak (the
cross-entropy is GEMM-bound: TFLOP/s and % of the FLOP peak too). On a CPU this section says it needs CUDA and
is skipped: the interpreter's speed means nothing. `--check` runs every case once at tiny sizes (on a CPU under
TRITON_INTERPRET=1) and compares each output with torch's, to check the wiring without timing.
Rows go to bench/results/kernels-fused.json.
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


def cases(m, k, n, w, q, state, w_dense, a, b, dtype, backend):
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


# Phi-3-mini: hidden 3072, 32 heads (= kv heads) of 96, intermediate 8192, vocabulary 32064.
MINI = dict(hidden=3072, heads=32, kv_heads=32, head_dim=96, inter=8192, vocab=32064)
TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, vocab=130)
FUSED_M = [4096, 16384]  # tokens per step: 4 x 1024 and 8 x 2048


def fused_cases(m: int, sizes: dict, device: torch.device, dtype: torch.dtype) -> list:  # noqa: C901
    """(op, impl, fn, flops, bytes) for the fused row-wise kernels at m tokens, each fn a forward + backward; phi3fast
    first. Every fn returns the forward output (for --check)."""
    import importlib

    from phi3fast.kernels import fused_linear_cross_entropy, rms_norm, rope_qkv_, swiglu

    liger = {}
    for mod in ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"):
        try:
            liger[mod] = importlib.import_module(f"liger_kernel.ops.{mod}")
        except Exception as exc:  # noqa: BLE001  (the bench still compares with torch)
            print(f"liger_kernel.ops.{mod}: {type(exc).__name__}: {exc}", file=sys.stderr)
    h, nh, nkv, d, inter, v = (
        sizes[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "inter", "vocab")
    )
    el = torch.finfo(dtype).bits // 8
    ours = "triton"
    out = []

    def fwd_bwd(forward: Callable[[], torch.Tensor], grad: torch.Tensor, leaves: list[torch.Tensor]):
        def run() -> torch.Tensor:
            for t in leaves:
                t.grad = None
            y = forward()
            y.backward(grad)
            return y

        return run

    # RMSNorm: read x, write y; backward reads x and dy, writes dx (weights and per-row scalars are negligible).
    x = torch.randn(m, h, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(h, device=device, dtype=dtype)).requires_grad_()
    dy = torch.randn(m, h, device=device, dtype=dtype)
    nbytes = 5 * m * h * el
    out.append(("rms_norm", "phi3fast", fwd_bwd(lambda: rms_norm(x, w, 1e-5, ours), dy, [x, w]), 0, nbytes))
    if "rms_norm" in liger:
        f = liger["rms_norm"].LigerRMSNormFunction
        out.append(("rms_norm", "liger", fwd_bwd(lambda: f.apply(x, w, 1e-5, 0.0, "llama", False), dy, [x, w]), 0,
                    nbytes))  # fmt: skip
    out.append(("rms_norm", "torch", fwd_bwd(lambda: rms_norm(x, w, 1e-5, "torch"), dy, [x, w]), 0, nbytes))

    # RoPE in place on the fused qkv (a clone first, for every impl: autograd needs a non-leaf to modify):
    # clone reads + writes qkv; forward and backward each read + write the q and k heads and read cos, sin.
    width = (nh + 2 * nkv) * d
    qkv0 = torch.randn(1, m, width, device=device, dtype=dtype, requires_grad=True)
    ang = torch.rand(1, m, d // 2, device=device) * 6.28
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    cos_full, sin_full = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # HF/Liger layout
    dq = torch.randn(1, m, width, device=device, dtype=dtype)
    nbytes = (2 * m * width + 2 * 2 * m * (nh + nkv) * d + 2 * m * d) * el

    def ours_rope(backend: str) -> Callable[[], torch.Tensor]:
        return lambda: rope_qkv_(qkv0.clone(), cos, sin, nh, nkv, backend)

    def liger_rope() -> torch.Tensor:
        qkv = qkv0.clone()
        heads = qkv.view(1, m, nh + 2 * nkv, d)
        q, k = heads[:, :, :nh].transpose(1, 2), heads[:, :, nh : nh + nkv].transpose(1, 2)
        q, k = liger["rope"].LigerRopeFunction.apply(q, k, cos_full, sin_full)
        vv = heads[:, :, nh + nkv :]
        return torch.cat([q.transpose(1, 2), k.transpose(1, 2), vv], 2).view(1, m, width)

    out.append(("rope_qkv", "phi3fast", fwd_bwd(ours_rope(ours), dq, [qkv0]), 0, nbytes))
    if "rope" in liger:
        out.append(("rope_qkv", "liger (+cat)", fwd_bwd(liger_rope, dq, [qkv0]), 0, nbytes))
    out.append(("rope_qkv", "torch", fwd_bwd(ours_rope("torch"), dq, [qkv0]), 0, nbytes))

    # SwiGLU: forward reads gate_up (2I) and writes I; backward reads dy (I) and gate_up (2I), writes 2I.
    gu = torch.randn(m, 2 * inter, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, inter, device=device, dtype=dtype)
    nbytes = 8 * m * inter * el
    out.append(("swiglu", "phi3fast", fwd_bwd(lambda: swiglu(gu, ours), dy, [gu]), 0, nbytes))
    if "swiglu" in liger:
        sw = liger["swiglu"]
        halves = lambda: sw.LigerSiLUMulFunction.apply(*gu.chunk(2, -1))  # noqa: E731
        out.append(("swiglu", "liger SiLUMul", fwd_bwd(halves, dy, [gu]), 0, nbytes))
        if hasattr(sw, "LigerFusedGateUpSiLUMulFunction"):
            fused = lambda: sw.LigerFusedGateUpSiLUMulFunction.apply(gu)  # noqa: E731
            out.append(("swiglu", "liger FusedGateUp", fwd_bwd(fused, dy, [gu]), 0, nbytes))
    out.append(("swiglu", "torch", fwd_bwd(lambda: swiglu(gu, "torch"), dy, [gu]), 0, nbytes))

    # Cross-entropy over the frozen lm_head (LoRA): GEMMs logits = h W^T and dH = G W (2 x 2 m v h FLOPs); the
    # logits are written by the GEMM, read + written by the row kernel and read by the dH GEMM.
    hid = (torch.randn(m, h, device=device) / h**0.25).to(dtype).requires_grad_()
    lm = (torch.randn(v, h, device=device) / h**0.5).to(dtype)
    labels = torch.randint(0, v, (m,), device=device)
    labels[: m // 4] = -100  # a prompt's worth of positions without a target
    one = torch.ones((), device=device)
    flops = 2 * 2.0 * m * v * h * 3 / 4  # only the 3/4 of rows with a target are projected (by phi3fast)
    nbytes = (m * h * 2 + v * h * 2 + 4 * m * v * 3 // 4) * el

    def plain() -> torch.Tensor:
        return torch.nn.functional.cross_entropy((hid @ lm.T).float(), labels, reduction="sum")

    def liger_ce() -> torch.Tensor:
        f = liger["fused_linear_cross_entropy"].LigerFusedLinearCrossEntropyFunction
        return f.apply(hid, lm, labels, None, None, -100, 0.0, 0.0, "sum")[0]

    ce = lambda b: lambda: fused_linear_cross_entropy(hid, lm, labels, backend=b)  # noqa: E731
    out.append(("linear_cross_entropy", "phi3fast", fwd_bwd(ce(ours), one, [hid]), flops, nbytes))
    if "fused_linear_cross_entropy" in liger:
        out.append(("linear_cross_entropy", "liger", fwd_bwd(liger_ce, one, [hid]), flops, nbytes))
    out.append(("linear_cross_entropy", "torch chunked", fwd_bwd(ce("torch"), one, [hid]), flops, nbytes))
    out.append(("linear_cross_entropy", "torch full logits", fwd_bwd(plain, one, [hid]), flops, nbytes))
    return out


def fused_section(device: torch.device, check: bool) -> None:
    if check:
        # Wiring check: every case once at tiny sizes; forward outputs vs torch's (no timing).
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        rows = []
        for op, impl, fn, _, _ in fused_cases(33, TINY, device, dtype):
            try:
                y = fn().detach().float()
                rows.append({"op": op, "impl": impl, "out": y})
            except Exception as exc:  # noqa: BLE001
                rows.append({"op": op, "impl": impl, "error": f"{type(exc).__name__}: {exc}"[:160]})
        for r in rows:
            ref = next(x for x in rows if x["op"] == r["op"] and x["impl"].startswith("torch"))
            if "out" in r and "out" in ref:
                r["rel_err_vs_torch"] = float((r["out"] - ref["out"]).norm() / ref["out"].norm())
        print_table(rows, ["op", "impl", "rel_err_vs_torch", "error"])
        return
    if device.type != "cuda":
        print("fused row-wise kernels vs Liger-Kernel and torch: needs CUDA, skipped on this CPU "
              "(timing Triton's interpreter would mean nothing)")  # fmt: skip
        return
    dtype = torch.bfloat16
    peak_tflops, peak_gbs = peak(device)
    rows, times = [], {}
    for m in FUSED_M:
        for op, impl, fn, flops, nbytes in fused_cases(m, MINI, device, dtype):
            sec = bench(fn, device)
            times[(op, impl, m)] = sec
            row = {
                "op": op,
                "impl": impl,
                "M": m,
                "dtype": "bf16",
                "ms": sec * 1e3,
                "GB/s": nbytes / sec / 1e9,
            }
            if flops:
                row["TFLOP/s"] = flops / sec / 1e12
            if peak_gbs:
                row["%peak_bw"] = 100 * row["GB/s"] / peak_gbs
                if flops:
                    row["%peak_flops"] = 100 * row["TFLOP/s"] / peak_tflops
            row["phi3fast_speedup"] = sec / times[(op, "phi3fast", m)]
            rows.append(row)
            print(f"{op:21s} {impl:18s} M={m:6d} {sec * 1e3:9.3f} ms", file=sys.stderr)
    print_table(rows, ["op", "impl", "M", "dtype", "ms", "GB/s", "%peak_bw", "TFLOP/s", "%peak_flops",
                       "phi3fast_speedup"])  # fmt: skip
    print(f"Rows: {write_rows('kernels-fused', rows)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="CPU: every shape and M (the CUDA default)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="CPU activation dtype")
    parser.add_argument("--section", choices=["nf4", "fused", "all"], default="all",
                        help="nf4: NF4 matmul + LoRA; fused: the row-wise kernels (CUDA)")  # fmt: skip
    parser.add_argument(
        "--check", action="store_true", help="fused: run each case once at tiny sizes, no timing"
    )
    args = parser.parse_args()
    if args.section in ("fused", "all") or args.check:
        fused_section(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.check)
        if args.section == "fused" or args.check:
            return

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
