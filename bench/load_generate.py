"""Load memory and decode speed: phi3fast vs transformers (+ bitsandbytes 4-bit) on the same checkpoint.

    python bench/load_generate.py [--hidden 1024 --layers 4 --vocab 32064 --new-tokens 16]

1. Load: each loader runs in a fresh subprocess; we report the peak host memory it added over the process after
   imports (VmHWM - VmRSS before loading, after one 3-token forward so memory-mapped weights count) and the load
   wall time. phi3fast quantizes each linear as its tensor is read,
   so its peak should stay near the NF4 model plus one tensor; transformers + bitsandbytes is the peer.
2. Decode: greedy generation of --new-tokens tokens after a 32-token prompt, KV cache on both sides, batch 1,
   tokens/s (on CPU: phi3fast's torch reference ops; bitsandbytes' CPU 4-bit kernels for the peer).
The checkpoint is a random Phi-3 in transformers' format (init-tiny) with Phi-3's vocabulary size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_rows  # noqa: E402

LOADERS = {
    "phi3fast nf4": "from phi3fast.model import load; m = load(P, quantize='nf4', device='cpu')",
    "phi3fast none (fp32)": "from phi3fast.model import load; m = load(P, quantize=None, device='cpu')",
    "transformers+bnb nf4": (
        "from transformers import AutoModelForCausalLM, BitsAndBytesConfig\n"
        "q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,"
        " bnb_4bit_compute_dtype=torch.float32)\n"
        "m = AutoModelForCausalLM.from_pretrained(P, quantization_config=q, dtype=torch.float32, device_map='cpu')"
    ),
    "transformers fp32": (
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(P, dtype=torch.float32)"
    ),
}

_CHILD = """
import json, time, torch, transformers, bitsandbytes, phi3fast.model, phi3fast.model.loading
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
P = {path!r}
before = status('VmRSS:')
t0 = time.perf_counter()
{code}
dt = time.perf_counter() - t0
# One short forward: weights a loader left memory-mapped (lazy pages) become resident, as in real use.
with torch.no_grad():
    m(torch.tensor([[1, 2, 3]]))
print(json.dumps({{"peak_added_bytes": status('VmHWM:') - before, "rss_after_bytes": status('VmRSS:') - before,
                  "load_s": dt}}))
"""


def bench_load(path: Path) -> list[dict]:
    rows = []
    for name, code in LOADERS.items():
        out = subprocess.run(
            [sys.executable, "-c", _CHILD.format(path=str(path), code=code)], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "bench": "load",
                "loader": name,
                "peak_added_MB": r["peak_added_bytes"] / 2**20,
                "resident_MB": r["rss_after_bytes"] / 2**20,
                "load_s": r["load_s"],
            }
        )
        print(f"  {name}: {rows[-1]['peak_added_MB']:.0f} MB peak, {r['load_s']:.1f} s", flush=True)
    return rows


def bench_decode(path: Path, new_tokens: int) -> list[dict]:
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from phi3fast.generate import generate_tokens
    from phi3fast.model import load

    torch.manual_seed(0)
    prompt = torch.randint(100, 400, (32,)).tolist()
    rows = []
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    for quantize in ("nf4", None):
        ours = load(path, quantize=quantize, dtype=torch.float32, device="cpu")
        if quantize == "nf4":
            peer = AutoModelForCausalLM.from_pretrained(
                str(path), quantization_config=q, dtype=torch.float32, device_map="cpu"
            )
            for m in peer.modules():
                if isinstance(m, bnb.nn.Linear4bit):
                    m.support_avx512bf16_for_cpu = False  # its exact fp32 path, the same math as ours
        else:
            peer = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        peer.eval()

        def run_ours(model=ours) -> int:
            return len(list(generate_tokens(model, prompt, max_new_tokens=new_tokens, stop=set())))

        def run_peer(model=peer) -> int:
            with torch.inference_mode():
                out = model.generate(
                    torch.tensor([prompt]),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                )
            return out.shape[1] - len(prompt)

        for side, fn in (("phi3fast", run_ours), ("transformers", run_peer)):
            fn()  # warm-up
            t0 = time.perf_counter()
            n = fn()
            dt = time.perf_counter() - t0
            rows.append(
                {
                    "bench": "decode",
                    "side": side,
                    "base": quantize or "fp32",
                    "new_tokens": n,
                    "tokens_per_s": n / dt,
                }
            )
            print(f"  {side} {quantize or 'fp32'}: {n / dt:.1f} tokens/s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--parts", default="load,decode", help="comma-separated: load, decode")
    ap.add_argument(
        "--model",
        default=None,
        help="a real Phi-3 checkpoint (e.g. `phi3fast convert`'s SmolLM2) instead of a random one",
    )
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    from phi3fast.model.tiny import init_tiny

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:  # its own sizes replace the random model's
            path = Path(args.model)
            cfg = json.loads((path / "config.json").read_text())
            args.hidden, args.layers, args.vocab = (
                cfg["hidden_size"],
                cfg["num_hidden_layers"],
                cfg["vocab_size"],
            )
        else:
            path = init_tiny(
                Path(tmp) / "ckpt",
                hidden=args.hidden,
                layers=args.layers,
                heads=args.heads,
                intermediate=args.intermediate,
                vocab=args.vocab,
            )
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(
            f"checkpoint: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {size / 2**20:.0f} MB fp32"
        )
        rows = (bench_load(path) if "load" in parts else []) + (
            bench_decode(path, args.new_tokens) if "decode" in parts else []
        )
    for r in rows:
        r.update(hidden=args.hidden, layers=args.layers, vocab=args.vocab, checkpoint_MB=size / 2**20,
                 model=Path(args.model).name if args.model else "random (init_tiny)")  # fmt: skip
    write_rows("load_generate" + (f"_{Path(args.model).name}" if args.model else ""), rows)
    load_rows = [r for r in rows if r["bench"] == "load"]
    if load_rows:
        print_table(load_rows, ["loader", "peak_added_MB", "resident_MB", "load_s"])
    dec = [r for r in rows if r["bench"] == "decode"]
    if not dec:
        return
    for base in ("nf4", "fp32"):
        ours = next(r for r in dec if r["side"] == "phi3fast" and r["base"] == base)
        peer = next(r for r in dec if r["side"] == "transformers" and r["base"] == base)
        ours["ratio_vs_transformers"] = ours["tokens_per_s"] / peer["tokens_per_s"]
    print_table(dec, ["side", "base", "new_tokens", "tokens_per_s", "ratio_vs_transformers"])


if __name__ == "__main__":
    main()
