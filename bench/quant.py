"""NF4 quantize / dequantize on CPU: phi3fast.quant against bitsandbytes on the same tensor, in one run.

    python bench/quant.py [--shape 3072x8192] [--dtypes bf16,fp16,fp32] [--blocksize 64] [--threads N]

Both sides produce the same bytes (checked before timing). GB/s counts the dense weight once (read by quantize,
written by dequantize). x_bnb = bitsandbytes time / phi3fast time (> 1: phi3fast is faster). The last column
projects the measured quantize rate onto Phi-3-mini's 3.62e9 Linear parameters (32 layers of qkv, o, gate_up
and down projections): the load-time cost of `--quantize nf4` on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, timeit, write_rows  # noqa: E402

from phi3fast.quant import quantize_nf4  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PHI3_MINI_LINEAR_PARAMS = 32 * 3072 * (9216 + 3072 + 16384 + 8192)  # qkv, o, gate_up (in, out) and down


def bench(shape: tuple[int, int], dtype: torch.dtype, blocksize: int) -> list[dict[str, object]]:
    import bitsandbytes.functional as bnbf

    w = (torch.randn(shape) * 0.02).to(dtype)
    gbytes = w.numel() * w.element_size() / 1e9

    def ours_q():
        return quantize_nf4(w, blocksize)

    def bnb_q():
        return bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")

    ours, (packed, qs) = ours_q(), bnb_q()
    if not (torch.equal(ours.packed, packed) and torch.equal(ours.absmax, qs.absmax)):
        raise SystemExit("phi3fast and bitsandbytes disagree on this tensor; not timing different work")
    rows = []
    times = {
        "phi3fast": timeit(ours_q, warmup=1, repeat=3),
        "bitsandbytes": timeit(bnb_q, warmup=1, repeat=3),
    }
    for impl, t in times.items():
        rows.append(
            {
                "op": "quantize",
                "dtype": str(dtype).removeprefix("torch."),
                "impl": impl,
                "ms": t * 1e3,
                "GB/s": gbytes / t,
                "x_bnb": times["bitsandbytes"] / t,
                "phi3_mini_s": t * PHI3_MINI_LINEAR_PARAMS / w.numel(),
            }
        )
    times = {
        "phi3fast": timeit(lambda: ours.dequantize(dtype), warmup=1, repeat=3),
        "bitsandbytes": timeit(
            lambda: bnbf.dequantize_4bit(packed, qs, quant_type="nf4"), warmup=1, repeat=3
        ),
    }
    for impl, t in times.items():
        row = {"op": "dequantize", "dtype": str(dtype).removeprefix("torch."), "impl": impl, "ms": t * 1e3}
        rows.append({**row, "GB/s": gbytes / t, "x_bnb": times["bitsandbytes"] / t, "phi3_mini_s": ""})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shape", default="3072x8192", help="N x K of the weight (default: a Phi-3-mini down_proj)"
    )
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads for both sides (0: torch's default)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, k = (int(s) for s in args.shape.lower().split("x"))
    rows = []
    for name in args.dtypes.split(","):
        rows += bench((n, k), DTYPES[name], args.blocksize)
        print(f"done {name}", file=sys.stderr)
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    print(
        f"NF4 (double quant, blocksize {args.blocksize}) of a {n}x{k} weight on CPU, {threads} torch threads"
    )
    print(
        f"(1-minute load average {load:.1f} on {os.cpu_count()} CPUs: wall times include waiting for a core)"
    )
    for r in rows:
        r.update(shape=f"{n}x{k}", threads=threads, loadavg=load)
    print_table(rows, ["op", "dtype", "impl", "ms", "GB/s", "x_bnb", "phi3_mini_s"])
    print(f"wrote {write_rows(f'quant_{threads}t', rows)}")


if __name__ == "__main__":
    main()
