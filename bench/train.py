"""Training throughput and peak memory: `phi3fast train` against a transformers + PEFT + bitsandbytes QLoRA loop.

    python bench/train.py [--hidden 512 --layers 4 --vocab 32064 --batch 4 --seq-len 512 --rank 16 --steps 4]

Both sides train the same random Phi-3 checkpoint (written by phi3fast.tiny.init_tiny) on the same 4 x 512 token
rows with rank-16 LoRA on qkv_proj, o_proj, gate_up_proj and down_proj (alpha 32, dropout 0.05), AdamW, no
gradient checkpointing. Each configuration runs in its own subprocess, so the peak RSS (ru_maxrss, model load
included) is that side's alone. tokens/s is the median over the timed steps after warm-up. The peer runs in bf16
and fp32 compute and its fastest is the reference for the ratios; --quantize nf4 vs none gives QLoRA's cost over
LoRA on each side.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_rows  # noqa: E402

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_data(model_dir: Path, path: Path, rows: int, seq_len: int) -> None:
    """Text rows that each tokenize to more than seq_len tokens (so every row is exactly seq_len after truncation)."""
    from transformers import AutoTokenizer

    from phi3fast.tiny import CORPUS

    tok = AutoTokenizer.from_pretrained(model_dir)
    lines = [ln for ln in CORPUS.read_text().splitlines() if ln.strip()]
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            text = ""
            while len(tok(text)["input_ids"]) <= seq_len:
                text += " ".join(rng.sample(lines, min(8, len(lines)))) + " "
            f.write(json.dumps({"text": text}) + "\n")


def worker_phi3fast(a: argparse.Namespace) -> dict:
    from phi3fast.train import TrainConfig, train

    cpu_marks: list[float] = []  # process CPU time (all threads) at the end of each step

    def mark(step: int, metrics: dict) -> None:
        cpu_marks.append(time.process_time())

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        cfg = TrainConfig(model=a.model, data=a.data, out=out, max_steps=a.warmup + a.steps, batch_size=a.batch,
                          seq_len=a.seq_len, rank=a.rank, alpha=2 * a.rank, dropout=0.05, save_every=0,
                          quantize=a.quantize, dtype=a.dtype, progress=False, warmup=0)  # fmt: skip
        train(cfg, on_step=mark)
        total = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows[a.warmup :]]
    tokens = a.batch * a.seq_len
    cpu = [
        tokens / (t1 - t0) for t0, t1 in zip(cpu_marks[a.warmup - 1 :], cpu_marks[a.warmup :], strict=False)
    ]
    return {"tokens_per_s": statistics.median(tps), "tokens_per_cpu_s": statistics.median(cpu), "wall_s": total,
            "loss_last": rows[-1]["loss"]}  # fmt: skip


def worker_peft(a: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    t0 = time.perf_counter()
    kw = {}
    if a.quantize == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, **kw)
    model = get_peft_model(
        model,
        LoraConfig(
            r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"
        ),
    )
    model.train()
    tok = AutoTokenizer.from_pretrained(a.model)
    texts = [json.loads(line)["text"] for line in Path(a.data).read_text().splitlines()]
    ids = torch.tensor([tok(t)["input_ids"][: a.seq_len] for t in texts[: a.batch]])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    tps, cpu = [], []
    for step in range(a.warmup + a.steps):
        t, c = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= a.warmup:
            tps.append(ids.numel() / (time.perf_counter() - t))
            cpu.append(ids.numel() / (time.process_time() - c))
    return {
        "tokens_per_s": statistics.median(tps),
        "tokens_per_cpu_s": statistics.median(cpu),
        "wall_s": time.perf_counter() - t0,
        "loss_last": float(loss),
    }


def run_side(a: argparse.Namespace, impl: str, quantize: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--quantize", quantize, "--dtype", dtype,
           "--model", a.model, "--data", a.data, "--batch", str(a.batch), "--seq-len", str(a.seq_len),
           "--rank", str(a.rank), "--steps", str(a.steps), "--warmup", str(a.warmup)]  # fmt: skip
    print(f"running {impl} quantize={quantize} dtype={dtype} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return {
            "impl": impl,
            "quantize": quantize,
            "dtype": dtype,
            "error": proc.stderr.strip().splitlines()[-1],
        }
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"impl": impl, "quantize": quantize, "dtype": dtype, **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument(
        "--intermediate", type=int, default=1344, help="~8/3 x hidden as in Phi-3, a multiple of 64"
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    ap.add_argument("--phi3fast-dtypes", default="bf16,fp32")
    ap.add_argument("--peer-dtypes", default="bf16,fp32")
    # Worker mode (internal): one side, one configuration, result as JSON on stdout.
    ap.add_argument("--worker", choices=["phi3fast", "peft"])
    ap.add_argument("--quantize", default="nf4")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--model")
    ap.add_argument("--data")
    a = ap.parse_args()

    if a.worker:
        res = worker_phi3fast(a) if a.worker == "phi3fast" else worker_peft(a)
        res["peak_rss_bytes"] = peak_rss()
        print(json.dumps(res))
        return

    from phi3fast.tiny import init_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model = init_tiny(Path(tmp) / "model", hidden=a.hidden, layers=a.layers, heads=a.heads,
                          intermediate=a.intermediate, vocab=a.vocab)  # fmt: skip
        data = Path(tmp) / "rows.jsonl"
        make_data(model, data, a.batch * (a.steps + a.warmup), a.seq_len)
        a.model, a.data = str(model), str(data)
        rows = []
        for q in ("nf4", "none"):
            for d in a.phi3fast_dtypes.split(","):
                rows.append(run_side(a, "phi3fast", q, d))
            for d in a.peer_dtypes.split(","):
                rows.append(run_side(a, "peft", q, d))

    ok = [r for r in rows if "error" not in r]
    for q in ("nf4", "none"):
        peers = [r for r in ok if r["impl"] == "peft" and r["quantize"] == q]
        if not peers:
            continue
        best = max(peers, key=lambda r: r["tokens_per_s"])
        for r in ok:
            if r["quantize"] == q:
                r["x_tok_s"] = r["tokens_per_s"] / best["tokens_per_s"]
                r["x_tok_cpu_s"] = r["tokens_per_cpu_s"] / best["tokens_per_cpu_s"]
                r["x_rss"] = r["peak_rss_bytes"] / best["peak_rss_bytes"]
                r["peer"] = f"peft/{best['dtype']}"
    for r in ok:  # QLoRA's cost over LoRA on the same side and dtype
        lora = [
            x for x in ok if x["impl"] == r["impl"] and x["dtype"] == r["dtype"] and x["quantize"] == "none"
        ]
        if r["quantize"] == "nf4" and lora:
            r["nf4_vs_none_tok_s"] = r["tokens_per_s"] / lora[0]["tokens_per_s"]
        r["peak_rss_MB"] = r["peak_rss_bytes"] / 2**20
    shape = dict(
        vocab=a.vocab, hidden=a.hidden, layers=a.layers, batch=a.batch, seq_len=a.seq_len, rank=a.rank
    )
    for r in rows:
        r.update(shape)
    print(
        f"LoRA training step: Phi-3 shape vocab {a.vocab}, hidden {a.hidden}, {a.layers} layers; batch {a.batch} x "
        f"{a.seq_len} tokens; rank {a.rank} on {', '.join(TARGETS)}; threads {os.cpu_count()}"
    )
    print_table(
        rows,
        ["impl", "quantize", "dtype", "tokens_per_s", "tokens_per_cpu_s", "peak_rss_MB", "x_tok_s", "x_tok_cpu_s",
         "x_rss", "peer", "nf4_vs_none_tok_s", "error"],
    )  # fmt: skip
    print(f"wrote {write_rows('train', rows)}")


if __name__ == "__main__":
    main()
