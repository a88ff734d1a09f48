"""Training throughput and peak memory: `phi3fast train` against a transformers + PEFT + bitsandbytes QLoRA loop,
with and without the fused kernels, and the peak-RSS saving of the chunked cross-entropy.

    python bench/train.py [--hidden 512 --layers 4 --vocab 32064 --batch 4 --seq-len 512 --rank 16 --steps 4]
                          [--kernels triton,torch] [--section steps|loss-rss|all]

Both sides train the same random Phi-3 checkpoint (written by phi3fast.model.tiny.init_tiny) on the same 4 x 512 token
rows with rank-16 LoRA on qkv_proj, o_proj, gate_up_proj and down_proj (alpha 32, dropout 0.05), AdamW, no
gradient checkpointing. Each configuration runs in its own subprocess, so the peak RSS (ru_maxrss, model load
included) is that side's alone. tokens/s is the median over the timed steps after warm-up. The peer runs in bf16
and fp32 compute and its fastest is the reference for the ratios; --quantize nf4 vs none gives QLoRA's cost over
LoRA on each side.

--kernels: phi3fast runs once per backend of the fused row-wise kernels (RMSNorm, RoPE, SwiGLU, cross-entropy;
`phi3fast train --kernels`). 'triton' needs CUDA: on a CPU its row says so instead of timing Triton's interpreter.

Section loss-rss (CPU or CUDA): peak RSS of QLoRA training steps at one row of --rss-seq 2048 tokens on a model
with Phi-3's vocabulary (32064) and hidden size (3072) but --rss-layers 1 decoder layer, checkpoint stored in bf16
as Phi-3's is, with the loss computed two ways, each in a fresh process: phi3fast's chunked cross-entropy vs the
plain full-logits loss (lm_head over all positions, the [T, 32064] logits upcast to fp32, F.cross_entropy: what
transformers' causal-LM loss does). step_peak_rss is the peak RSS of the training steps: once the model is
loaded, the process's high-water mark VmHWM is reset (Linux /proc/self/clear_refs 5) and read after the steps, so
the loader's transient (load_peak, above a chunked-loss step here) does not mask them; step_over_model = that peak
minus the RSS just before the first step. process_maxrss is ru_maxrss of the whole process (load included).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
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
from common import REAL_MODEL, print_table, write_rows  # noqa: E402

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_data(model_dir: Path, path: Path, rows: int, seq_len: int) -> None:
    """Text rows that each tokenize to more than seq_len tokens (so every row is exactly seq_len after truncation)."""
    from transformers import AutoTokenizer

    from phi3fast.model.tiny import CORPUS

    tok = AutoTokenizer.from_pretrained(model_dir)
    lines = [ln for ln in CORPUS.read_text().splitlines() if ln.strip()]
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            text = ""
            while len(tok(text)["input_ids"]) <= seq_len:
                text += " ".join(rng.sample(lines, min(8, len(lines)))) + " "
            f.write(json.dumps({"text": text}) + "\n")


def vm_hwm() -> int:
    """The address space's peak RSS (VmHWM), which /proc/self/clear_refs can reset, unlike ru_maxrss."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker_loss_rss(a: argparse.Namespace) -> dict:
    """QLoRA steps on one row of a.seq_len tokens with the chunked or the full-logits loss; peak RSS and step time."""
    import torch
    import torch.nn.functional as F

    from phi3fast import lora
    from phi3fast.model import load
    from phi3fast.training.loss import chunked_cross_entropy
    from phi3fast.training.precision import resolve_dtype

    dtype = resolve_dtype(a.dtype, torch.device("cpu"))
    model = load(a.model, dtype=dtype, quantize="nf4")
    lora.apply_lora(model, lora.LoraConfig(r=a.rank, alpha=2 * a.rank, dropout=0.05))
    model.train()
    params = lora.lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=2e-4)
    vocab = model.lm_head.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, a.seq_len), generator=g)
    labels = torch.cat([ids[0, 1:], torch.tensor([-100])])  # next-token targets; the last position has none
    load_peak = peak_rss()
    # The loader's transient (checkpoint read + NF4 quantization) peaks above a chunked-loss step, so ru_maxrss
    # (which Linux never lowers once a thread has exited) would hide the step. Return freed heap to the OS, then
    # reset the address space's high-water mark VmHWM (/proc/self/clear_refs 5): VmHWM at the end is the peak of
    # the training steps themselves, with the model, adapters and optimizer resident.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = current_rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if vm_hwm() >= load_peak:
        raise RuntimeError("VmHWM did not reset: cannot separate the step's peak from the load's")
    times, losses = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        hidden = model.hidden_states(ids).reshape(a.seq_len, -1)
        if a.loss == "chunked":
            loss = chunked_cross_entropy(hidden, model.lm_head.weight, labels, reduction="mean")
        else:
            loss = F.cross_entropy(model.lm_head(hidden).float(), labels, ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"load_peak_bytes": load_peak, "rss_before_step_bytes": before, "step_peak_bytes": vm_hwm(),
            "step_s": statistics.median(times),
            "loss_first": losses[0], "dtype": str(dtype)[6:]}  # fmt: skip


def loss_rss_section(a: argparse.Namespace, tmp: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from phi3fast.model.tiny import init_tiny

    print(f"loss-rss: writing a Phi-3-vocab checkpoint (hidden {a.rss_hidden}, {a.rss_layers} layer(s))",
          file=sys.stderr, flush=True)  # fmt: skip
    model = init_tiny(tmp / "rss-model", hidden=a.rss_hidden, layers=a.rss_layers, heads=a.rss_heads,
                      intermediate=a.rss_intermediate, vocab=a.vocab)  # fmt: skip
    weights = model / "model.safetensors"
    save_file(
        {k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights
    )  # bf16, as Phi-3 ships
    rows = []
    for loss in ("chunked", "full"):
        cmd = [sys.executable, __file__, "--worker", "loss-rss", "--loss", loss, "--model", str(model),
               "--seq-len", str(a.rss_seq), "--rank", str(a.rank), "--steps", str(a.rss_steps),
               "--dtype", a.rss_dtype, "--hidden", str(a.rss_hidden)]  # fmt: skip
        print(f"running loss={loss} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            rows.append({"loss": loss, "error": proc.stderr.strip().splitlines()[-1]})
            continue
        rows.append({"loss": loss, **json.loads(proc.stdout.strip().splitlines()[-1])})
    for r in rows:
        if "error" in r:
            continue
        r["step_peak_rss_MB"] = r["step_peak_bytes"] / 2**20
        r["process_maxrss_MB"] = r["peak_rss_bytes"] / 2**20
        r["load_peak_MB"] = r["load_peak_bytes"] / 2**20
        r["step_over_model_MB"] = (r["step_peak_bytes"] - r["rss_before_step_bytes"]) / 2**20
        r.update(vocab=a.vocab, hidden=a.rss_hidden, layers=a.rss_layers, seq_len=a.rss_seq, rank=a.rank)
    ok = {r["loss"]: r for r in rows if "error" not in r}
    if len(ok) == 2:
        saved = ok["full"]["step_peak_bytes"] - ok["chunked"]["step_peak_bytes"]
        ok["chunked"]["rss_saved_MB"] = saved / 2**20
        ok["chunked"]["x_step_peak"] = ok["chunked"]["step_peak_bytes"] / ok["full"]["step_peak_bytes"]
    print(
        f"\nQLoRA step peak RSS, chunked vs full-logits loss: vocab {a.vocab}, hidden {a.rss_hidden}, "
        f"{a.rss_layers} layer(s), 1 x {a.rss_seq} tokens, rank {a.rank}, {a.rss_steps} steps per process"
    )
    print_table(rows, ["loss", "dtype", "step_peak_rss_MB", "step_over_model_MB", "rss_saved_MB", "x_step_peak",
                       "process_maxrss_MB", "load_peak_MB", "step_s", "loss_first", "error"])  # fmt: skip
    print(f"wrote {write_rows('train-loss-rss', rows)}")


def worker_phi3fast(a: argparse.Namespace) -> dict:
    from phi3fast.train import TrainConfig, train

    cpu_marks: list[float] = []  # process CPU time (all threads) at the end of each step

    def mark(step: int, metrics: dict) -> None:
        cpu_marks.append(time.process_time())

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        cfg = TrainConfig(model=a.model, data=a.data, out=out, max_steps=a.warmup + a.steps, batch_size=a.batch,
                          seq_len=a.seq_len, rank=a.rank, alpha=2 * a.rank, dropout=0.05, save_every=0,
                          quantize=a.quantize, dtype=a.dtype, progress=False, warmup=0,
                          kernels=a.kernels)  # fmt: skip
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


def run_side(
    a: argparse.Namespace, impl: str, quantize: str, dtype: str, kernels: str = "", compute: str = ""
) -> dict:
    """One side in its own process; compute='bf16' sets PHI3FAST_NF4_COMPUTE (the NF4 CPU GEMMs' bf16 option)."""
    side = {"impl": impl, "quantize": quantize, "dtype": dtype, "kernels": kernels}
    if compute:
        side["compute"] = compute
    cmd = [sys.executable, __file__, "--worker", impl, "--quantize", quantize, "--dtype", dtype,
           "--model", a.model, "--data", a.data, "--batch", str(a.batch), "--seq-len", str(a.seq_len),
           "--rank", str(a.rank), "--steps", str(a.steps), "--warmup", str(a.warmup)]  # fmt: skip
    if kernels:
        cmd += ["--kernels", kernels]
    print(f"running {impl} quantize={quantize} dtype={dtype} {kernels} ...", file=sys.stderr, flush=True)
    env = {**os.environ, "PHI3FAST_NF4_COMPUTE": compute} if compute else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return {**side, "error": proc.stderr.strip().splitlines()[-1]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**side, **res}


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
    ap.add_argument(
        "--kernels", default="triton,torch", help="phi3fast fused-kernel backends to run (triton: CUDA)"
    )
    ap.add_argument("--section", choices=["steps", "loss-rss", "cpu-real", "all"], default="all",
                    help="cpu-real (not in 'all'): QLoRA on the real SmolLM2 model, phi3fast's native CPU kernels "
                    "vs HF + PEFT + bitsandbytes")  # fmt: skip
    ap.add_argument(
        "--real-model", default=str(REAL_MODEL), help="cpu-real: Phi-3-layout dir (`make demo` makes it)"
    )
    ap.add_argument("--real-rounds", type=int, default=1, help="cpu-real: interleaved rounds (best of)")
    ap.add_argument(
        "--real-compute", default="fp32", help="cpu-real: phi3fast NF4 GEMM compute modes to run (fp32,bf16)"
    )
    ap.add_argument("--quantize-modes", default="nf4,none", help="steps: nf4 (QLoRA) and/or none (LoRA)")
    ap.add_argument(
        "--steps-model",
        default=None,
        help="steps: train this Phi-3 checkpoint (e.g. `phi3fast convert`'s SmolLM2) instead of a random one",
    )
    ap.add_argument("--rss-hidden", type=int, default=3072, help="loss-rss: Phi-3-mini's hidden size")
    ap.add_argument("--rss-layers", type=int, default=1)
    ap.add_argument("--rss-heads", type=int, default=32)
    ap.add_argument("--rss-intermediate", type=int, default=8192)
    ap.add_argument("--rss-seq", type=int, default=2048)
    ap.add_argument("--rss-steps", type=int, default=2)
    ap.add_argument("--rss-dtype", default="auto")
    # Worker mode (internal): one side, one configuration, result as JSON on stdout.
    ap.add_argument("--worker", choices=["phi3fast", "peft", "loss-rss"])
    ap.add_argument("--loss", choices=["chunked", "full"], default="chunked")
    ap.add_argument("--quantize", default="nf4")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--model")
    ap.add_argument("--data")
    a = ap.parse_args()

    if a.worker:
        workers = {"phi3fast": worker_phi3fast, "peft": worker_peft, "loss-rss": worker_loss_rss}
        res = workers[a.worker](a)
        res["peak_rss_bytes"] = peak_rss()
        print(json.dumps(res))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if a.section in ("steps", "all"):
            steps_section(a, Path(tmp))
        if a.section in ("loss-rss", "all"):
            loss_rss_section(a, Path(tmp))
        if a.section == "cpu-real":
            cpu_real_section(a, Path(tmp))


def steps_section(a: argparse.Namespace, tmp: Path) -> None:
    import torch

    from phi3fast.model.tiny import init_tiny

    backends = [k.strip() for k in a.kernels.split(",") if k.strip()]
    rows = []
    if not torch.cuda.is_available() and "triton" in backends:
        # On a CPU the Triton kernels only run in the interpreter, whose speed says nothing about theirs.
        backends.remove("triton")
        rows.append({"impl": "phi3fast", "kernels": "triton", "error": "needs CUDA: not timed on a CPU"})
        print(
            "phi3fast --kernels triton: needs CUDA; on this CPU only --kernels torch is timed",
            file=sys.stderr,
        )
    if a.steps_model:  # a real checkpoint: its own sizes replace the random model's
        model = Path(a.steps_model)
        cfg = json.loads((model / "config.json").read_text())
        a.vocab, a.hidden, a.layers = cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]
    else:
        model = init_tiny(tmp / "model", hidden=a.hidden, layers=a.layers, heads=a.heads,
                          intermediate=a.intermediate, vocab=a.vocab)  # fmt: skip
    data = tmp / "rows.jsonl"
    make_data(model, data, a.batch * (a.steps + a.warmup), a.seq_len)
    a.model, a.data = str(model), str(data)
    for q in a.quantize_modes.split(","):
        for d in a.phi3fast_dtypes.split(","):
            for k in backends:
                rows.append(run_side(a, "phi3fast", q, d, k))
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
    same = lambda x, r: x["impl"] == r["impl"] and x["dtype"] == r["dtype"]  # noqa: E731
    for r in ok:
        # QLoRA's cost over LoRA, and the fused kernels' gain over the torch ones, on the same side and dtype.
        lora = [x for x in ok if same(x, r) and x["kernels"] == r["kernels"] and x["quantize"] == "none"]
        if r["quantize"] == "nf4" and lora:
            r["nf4_vs_none_tok_s"] = r["tokens_per_s"] / lora[0]["tokens_per_s"]
        plain = [x for x in ok if same(x, r) and x["quantize"] == r["quantize"] and x["kernels"] == "torch"]
        if r["kernels"] == "triton" and plain:
            r["triton_vs_torch_tok_s"] = r["tokens_per_s"] / plain[0]["tokens_per_s"]
        r["peak_rss_MB"] = r["peak_rss_bytes"] / 2**20
    shape = dict(
        vocab=a.vocab,
        hidden=a.hidden,
        layers=a.layers,
        batch=a.batch,
        seq_len=a.seq_len,
        rank=a.rank,
        model=Path(a.steps_model).name if a.steps_model else "random (init_tiny)",
    )
    for r in rows:
        r.update(shape)
    print(
        f"LoRA training step: {shape['model']}, Phi-3 shape vocab {a.vocab}, hidden {a.hidden}, {a.layers} layers; batch {a.batch} x "
        f"{a.seq_len} tokens; rank {a.rank} on {', '.join(TARGETS)}; threads {os.cpu_count()}"
    )
    print_table(
        rows,
        ["impl", "quantize", "dtype", "kernels", "tokens_per_s", "tokens_per_cpu_s", "peak_rss_MB", "x_tok_s",
         "x_tok_cpu_s", "x_rss", "peer", "nf4_vs_none_tok_s", "triton_vs_torch_tok_s", "error"],
    )  # fmt: skip
    name = "train" + (f"_{Path(a.steps_model).name}" if a.steps_model else "")
    print(f"wrote {write_rows(name, rows)}")


def cpu_real_section(a: argparse.Namespace, tmp: Path) -> None:
    """QLoRA on the real model (SmolLM2-135M-Instruct in Phi-3 layout) on CPU, fp32 compute: phi3fast (its NF4
    ops on the native kernels: forward, LoRA fused, dX through the frozen base) against HF + PEFT + bitsandbytes,
    --batch x --seq-len tokens (4 x 256 for the issue's figure), rank --rank on all four targets, each side in its
    own process, the sides interleaved --real-rounds times (best tokens/s, lowest peak RSS). --real-compute
    fp32,bf16 adds a phi3fast side with the NF4 GEMMs' bf16 compute option (PHI3FAST_NF4_COMPUTE=bf16)."""
    data = tmp / "real_rows.jsonl"
    make_data(Path(a.real_model), data, a.batch * (a.steps + a.warmup), a.seq_len)
    a.model, a.data = a.real_model, str(data)
    computes = [c.strip() for c in a.real_compute.split(",") if c.strip()]
    sides = [(f"phi3fast {c}" if c != "fp32" else "phi3fast", "phi3fast", c) for c in computes]
    sides.append(("peft", "peft", ""))
    best: dict[str, dict] = {}
    for _ in range(a.real_rounds):
        for key, impl, compute in sides:
            kernels = "torch" if impl == "phi3fast" else ""
            r = run_side(a, impl, "nf4", "fp32", kernels, compute if compute != "fp32" else "")
            if "error" in r:
                best.setdefault(key, r)
                continue
            old = best.get(key)
            if old is None or "error" in old:
                best[key] = r
            else:
                old["tokens_per_s"] = max(old["tokens_per_s"], r["tokens_per_s"])
                old["peak_rss_bytes"] = min(old["peak_rss_bytes"], r["peak_rss_bytes"])
    rows = [best[key] for key, _, _ in sides if key in best]
    ok = {key: best[key] for key, _, _ in sides if key in best and "error" not in best[key]}
    for r in ok.values():
        r["peak_rss_MB"] = r["peak_rss_bytes"] / 2**20
        r.update(model=Path(a.real_model).name, batch=a.batch, seq_len=a.seq_len, rank=a.rank)
    if "peft" in ok:
        for key, r in ok.items():
            if key != "peft":
                r["x_tok_s"] = r["tokens_per_s"] / ok["peft"]["tokens_per_s"]
                r["x_rss"] = r["peak_rss_bytes"] / ok["peft"]["peak_rss_bytes"]
    load = os.getloadavg()
    print(
        f"QLoRA on {Path(a.real_model).name}: {a.batch} x {a.seq_len} tokens, rank {a.rank} on {', '.join(TARGETS)}; "
        f"load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print_table(
        rows,
        ["impl", "compute", "quantize", "dtype", "tokens_per_s", "peak_rss_MB", "x_tok_s", "x_rss", "error"],
    )
    print(f"wrote {write_rows('train_cpu_real', rows)}")


if __name__ == "__main__":
    main()
