"""Where the time of one CPU decode step goes, on the real model: the native step's phases, and the torch path.

    python bench/decode_profile.py [--model-dir DIR] [--quantize nf4|none] [--lm-head float32|bfloat16]
                                   [--steps 64] [--rows 1] [--threads 2]

native: NativeDecoder's phase timers (csrc/nf4/decode_step.h) over `--steps` steps of `--rows` sequences after a
30-token prompt. torch: the torch-module decode loop (phi3fast.generate with the native step turned off), with the
time inside the NF4 kernel calls (nf4_cpu.linear) and the lm_head GEMV (nf4_cpu.dense_linear) measured around
them; the rest of its step is Python and torch ops. Prints milliseconds per step; JSON:
bench/results/decode_profile.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL_MODEL, print_table, write_rows  # noqa: E402

PHASES = ("other", "qkv", "attention", "o_proj", "gate_up", "swiglu", "down", "lm_head")
PROMPT = list(range(100, 130))


def native_profile(model, steps: int, rows: int) -> dict:
    import torch

    from phi3fast.model.native_decode import NativeDecoder

    dec = NativeDecoder(model, len(PROMPT) + steps + 1)
    cfg = model.config
    cache = model.new_kv_cache(rows, len(PROMPT) + steps + 1)
    tokens = torch.tensor(PROMPT[:rows] * 1, dtype=torch.int64)[:rows]
    adapters = torch.full((rows,), dec.own_adapter, dtype=torch.int32)
    logits = torch.empty((rows, cfg.vocab_size))
    # Fill the first positions by native steps too (what is timed is a step at positions 30..30+steps).
    for p in range(len(PROMPT)):
        dec.step(tokens, torch.full((rows,), p, dtype=torch.int64), adapters, cache.k, cache.v, logits)
    dec._d.set_profiling(True)
    t0 = time.perf_counter()
    for p in range(len(PROMPT), len(PROMPT) + steps):
        dec.step(tokens, torch.full((rows,), p, dtype=torch.int64), adapters, cache.k, cache.v, logits)
        tokens = logits.argmax(-1)
    total = time.perf_counter() - t0
    row = {"path": "native step", "rows": rows, "ms/step": 1000 * total / steps}
    phases = dec._d.profile()
    row.update({f"{name} ms": 1000 * s / steps for name, s in zip(PHASES, phases, strict=True)})
    row["python+call ms"] = row["ms/step"] - sum(1000 * s / steps for s in phases)
    row["tok/s"] = rows * steps / total
    return row


def torch_profile(model, steps: int) -> dict:
    from phi3fast.kernels import nf4_cpu

    from phi3fast import generate
    from phi3fast.model import native_decode

    spent = {"linear": 0.0, "dense_linear": 0.0}
    originals = {name: getattr(nf4_cpu, name) for name in spent}

    def timed(name):
        def call(*a, **k):
            t = time.perf_counter()
            out = originals[name](*a, **k)
            spent[name] += time.perf_counter() - t
            return out

        return call

    unsupported = native_decode.unsupported
    native_decode.unsupported = lambda m: "profiling the torch path"
    try:
        list(generate.generate_tokens(model, PROMPT, max_new_tokens=4, stop=()))
        for name in spent:
            setattr(nf4_cpu, name, timed(name))
        t_pre = time.perf_counter()
        list(generate.generate_tokens(model, PROMPT, max_new_tokens=1, stop=()))
        prefill = time.perf_counter() - t_pre
        spent.update(linear=0.0, dense_linear=0.0)
        t0 = time.perf_counter()
        list(generate.generate_tokens(model, PROMPT, max_new_tokens=steps + 1, stop=()))
        total = time.perf_counter() - t0 - prefill
    finally:
        native_decode.unsupported = unsupported
        for name, fn in originals.items():
            setattr(nf4_cpu, name, fn)
    per = 1000 / steps
    row = {"path": "torch modules", "rows": 1, "ms/step": total * per}
    row["NF4 linears ms"] = spent["linear"] * per
    row["lm_head ms"] = spent["dense_linear"] * per
    row["python+torch ops ms"] = row["ms/step"] - row["NF4 linears ms"] - row["lm_head ms"]
    row["tok/s"] = steps / total
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(REAL_MODEL))
    ap.add_argument("--quantize", default="nf4", choices=("nf4", "none"))
    ap.add_argument("--lm-head", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rows", default="1", help="comma-separated batch sizes of the native step, e.g. 1,4,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch-path profile")
    args = ap.parse_args()
    import os

    import torch

    from phi3fast.model import load
    from phi3fast.model.lm_head import store_lm_head

    torch.set_num_threads(args.threads)
    model = load(
        args.model_dir, quantize=None if args.quantize == "none" else "nf4", device="cpu", dtype=None
    )
    store_lm_head(model, args.lm_head)
    rows = []
    if not args.no_torch:
        rows.append(torch_profile(model, args.steps))
    with torch.inference_mode():
        for m in (int(r) for r in args.rows.split(",")):
            rows.append(native_profile(model, args.steps, m))
    columns = ["path", "rows", "ms/step", "tok/s", "NF4 linears ms", "lm_head ms", "python+torch ops ms"]
    columns += [f"{p} ms" for p in PHASES if p != "lm_head"] + ["python+call ms"]
    print(
        f"quantize={args.quantize} lm_head={args.lm_head} threads={args.threads} load={os.getloadavg()[0]:.1f}"
    )
    print_table(rows, columns)
    params = {"quantize": args.quantize, "lm_head": args.lm_head, "threads": args.threads}
    print(f"wrote {write_rows('decode_profile', [{**params, **r} for r in rows])}")


if __name__ == "__main__":
    main()
