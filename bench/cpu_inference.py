"""CPU inference on a real model: phi3fast (NF4 and fp32) vs transformers (fp32, + bitsandbytes NF4) and llama.cpp.

    python bench/cpu_inference.py [--model-dir DIR --gguf FILE --rounds 2 --new-tokens 64 --prefill-tokens 1024]

The model is SmolLM2-135M-Instruct: its Phi-3-layout conversion (DIR, read by phi3fast and transformers) and the
Q4_1 GGUF it came from (read by llama.cpp through llama-cpp-python, the optional `bench` extra). Every engine
runs in its own subprocess (so peak RSS is its own), the engines interleaved, `--rounds` times; each figure is
the best over rounds and over `--reps` repetitions inside a round (the machine is shared: best-of-N is the
figure least disturbed by other load). Every engine gets the same token ids (the converted dir's tokenizer).

Columns:
- decode tok/s: batch 1, greedy, `--new-tokens` new tokens after a short chat prompt, end of sequence ignored
  (end to end: the prompt's prefill is inside the time);
- prefill tok/s: a `--prefill-tokens` prompt up to the first new token;
- load s: building the model from the files; peak RSS MB: the process's VmHWM at the end;
- phi3fast nf4 bf16-head: the same with the lm_head stored in bf16 (phi3fast.model.lm_head.store_lm_head), an
  opt-in that rounds the head's weights once; its first tokens are printed next to the fp32 head's;
- phi3fast nf4 bf16: the NF4 engine with the bf16 compute option of the large-M GEMMs (PHI3FAST_NF4_COMPUTE=bf16:
  AVX512-BF16 products, fp32 sums; prefill changes, decode's GEMV stays fp32). transformers+bnb runs as users run
  it: on this AVX512-BF16 CPU bitsandbytes switches Linear4bit to its bf16 kernel in eval under no_grad;
- phi3fast NF4 only: the NF4 linears of every layer at M = 1, 4, 16 rows (batched decode's GEMMs), as tokens/s
  through all layers' projections (M / time of one pass);
- phi3fast rows: "batch M tok/s", the native decode step with M sequences at once (the server's batched step,
  one token per row per step, after a 30-token context), M * steps / time.
llama.cpp: its state is reset before every generation, so no repetition reuses a cached prompt prefix (without
the reset, llama-cpp-python matches the prompt against its KV cache and skips the prefill).
JSON: bench/results/cpu_inference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL_GGUF, REAL_MODEL, print_table, write_rows  # noqa: E402

MODEL_DIR = str(REAL_MODEL)  # `make demo` makes both
GGUF = str(REAL_GGUF)
ENGINES = (
    "phi3fast nf4",
    "phi3fast nf4 bf16-head",
    "phi3fast nf4 bf16",
    "phi3fast fp32",
    "transformers fp32",
    "transformers+bnb nf4",
    "llama.cpp q4_1",
)
OURS = (
    "phi3fast nf4",
    "phi3fast nf4 bf16-head",
    "phi3fast nf4 bf16",
)  # the rows every engine is compared with
CHAT = [{"role": "user", "content": "Give me three tips for keeping a vegetable garden healthy in summer."}]
FILLER = (
    "Retrieval-augmented generation answers a question from passages found in a document index. The passages are "
    "placed before the question, so the model reads a long prompt before it writes its first word. "
)
KERNEL_MS = (1, 4, 16)
BATCH_MS = (1, 4, 16)


def status_bytes(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---- engines (each runs inside a worker subprocess) ----------------------------------------------------------------


def _phi3fast(args, quantize, head_dtype="float32"):
    from phi3fast.generate import generate_tokens
    from phi3fast.model import load
    from phi3fast.model.lm_head import store_lm_head

    model = load(args.model_dir, quantize=quantize, device="cpu", dtype=None)
    store_lm_head(model, head_dtype)

    def decode(ids, n):
        return list(generate_tokens(model, ids, max_new_tokens=n, stop=()))

    return model, decode


def _transformers(args, bnb):
    import torch
    from transformers import AutoModelForCausalLM

    kw = {}
    if bnb:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
        kw["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, **kw).eval()

    def decode(ids, n):
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
        return out[0, len(ids) :].tolist()

    return model, decode


def _llama_cpp(args):
    from llama_cpp import Llama

    model = Llama(model_path=args.gguf, n_threads=args.threads, n_ctx=4096, n_batch=512, verbose=False)

    def decode(ids, n):
        model.reset()  # forget the cached prompt: every repetition prefills from scratch
        out = []
        for tok in model.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
            out.append(int(tok))
            if len(out) >= n:
                break
        return out

    return model, decode


def _kernel_rows(model, reps: int) -> dict[str, float]:
    """Tokens/s through every NF4 projection of the model at M rows (the ops the model itself calls)."""
    import torch
    from phi3fast.kernels import nf4_matmul

    weights = [lin.nf4 for lin in model.linears().values() if lin.nf4 is not None]
    out = {}
    for m in KERNEL_MS:
        xs = [torch.randn(m, w.shape[1]) for w in weights]

        def one_pass(xs=xs):
            for x, w in zip(xs, weights, strict=True):
                nf4_matmul(x, w)

        one_pass()
        out[f"kernels M={m} tok/s"] = m / best_time(one_pass, reps)
    return out


def _batched_steps(model, steps: int) -> dict[str, float]:
    """Tokens/s of the native decode step with M rows at once, after 30 positions of context."""
    import torch

    from phi3fast.model.native_decode import NativeDecoder

    context = 30
    dec = NativeDecoder(model, context + steps + 1)
    out = {}
    for m in BATCH_MS:
        cache = model.new_kv_cache(m, context + steps + 1)
        tokens = torch.arange(100, 100 + m, dtype=torch.int64)
        rows = torch.full((m,), dec.own_adapter, dtype=torch.int32)
        logits = torch.empty((m, model.config.vocab_size))

        def run(first, last, tokens=tokens, cache=cache, rows=rows, logits=logits):
            for p in range(first, last):
                dec.step(
                    tokens, torch.full(tokens.shape, p, dtype=torch.int64), rows, cache.k, cache.v, logits
                )

        run(0, context)
        t0 = time.perf_counter()
        run(context, context + steps)
        out[f"batch M={m} tok/s"] = m * steps / (time.perf_counter() - t0)
    return out


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.ids_file).read_text())
    t0 = time.perf_counter()
    if args.worker.startswith("phi3fast"):
        if args.worker.endswith(" bf16"):
            os.environ["PHI3FAST_NF4_COMPUTE"] = "bf16"
        head = "bfloat16" if args.worker.endswith("bf16-head") else "float32"
        model, decode = _phi3fast(args, "nf4" if "nf4" in args.worker else None, head)
    elif args.worker.startswith("transformers"):
        model, decode = _transformers(args, bnb="bnb" in args.worker)
    else:
        model, decode = _llama_cpp(args)
    row: dict = {"engine": args.worker, "load s": time.perf_counter() - t0}
    chat, long = spec["chat"], spec["prefill"]
    tokens = decode(chat, args.new_tokens)  # warm-up, and the tokens for the agreement check
    row["first tokens"] = tokens[:16]
    t = best_time(lambda: decode(chat, args.new_tokens), args.reps)
    row["decode tok/s"] = args.new_tokens / t
    decode(long[:64], 1)
    row["prefill tok/s"] = len(long) / best_time(lambda: decode(long, 1), args.reps)
    if args.worker == "phi3fast nf4":
        row.update(_kernel_rows(model, max(args.reps, 3)))
    if args.worker.startswith("phi3fast"):
        from phi3fast.model import native_decode

        if native_decode.unsupported(model) is None:
            row.update(_batched_steps(model, args.new_tokens // 2))
    row["peak RSS MB"] = status_bytes("VmHWM:") / 2**20
    return row


# ---- parent: interleaved rounds, best of each figure, ratios -------------------------------------------------------


def prompt_ids(args) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat = tok(text, add_special_tokens=False)["input_ids"]
    filler = tok(FILLER * (args.prefill_tokens // 20 + 8), add_special_tokens=False)["input_ids"]
    return {"chat": chat, "prefill": filler[: args.prefill_tokens]}


def run_worker(args, engine: str, ids_file: Path) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", engine, "--ids-file", str(ids_file)]
    for flag in ("model_dir", "gguf", "threads", "new_tokens", "reps"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {engine}: failed ({last})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge_best(best: dict, row: dict) -> None:
    for key, value in row.items():
        lower_is_better = key in ("load s", "peak RSS MB")
        if key not in best or not isinstance(value, float):
            best.setdefault(key, value)
        elif (value < best[key]) if lower_is_better else (value > best[key]):
            best[key] = value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=MODEL_DIR)
    ap.add_argument("--gguf", default=GGUF)
    ap.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated subset of: " + ", ".join(ENGINES)
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=1024)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ids-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    engines = [e.strip() for e in args.engines.split(",")]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        sys.exit(f"error: unknown engine(s) {unknown}; expected some of {list(ENGINES)}")
    ids_file = Path(__file__).resolve().parent / "results" / ".cpu_inference_ids.json"
    ids_file.parent.mkdir(parents=True, exist_ok=True)
    ids_file.write_text(json.dumps(prompt_ids(args)))
    print(f"load average at start: {os.getloadavg()[0]:.1f}", file=sys.stderr)
    best: dict[str, dict] = {e: {} for e in engines}
    for r in range(args.rounds):
        for engine in engines:
            print(f"round {r + 1}/{args.rounds}: {engine}", file=sys.stderr, flush=True)
            row = run_worker(args, engine, ids_file)
            if row is not None:
                merge_best(best[engine], row)
    ids_file.unlink()
    rows = [best[e] for e in engines if best[e]]
    ratio_columns = []
    for name in OURS:
        ours = best.get(name, {})
        tag = name.removeprefix("phi3fast ")
        for metric in ("decode tok/s", "prefill tok/s"):
            col = f"{tag} / this ({metric.split()[0]})"
            if metric in ours:
                ratio_columns.append(col)
            for row in rows:
                if metric in ours and metric in row:
                    row[col] = ours[metric] / row[metric]
    columns = ["engine", "decode tok/s", "prefill tok/s", "load s", "peak RSS MB", *ratio_columns]
    columns += [f"batch M={m} tok/s" for m in BATCH_MS] + [f"kernels M={m} tok/s" for m in KERNEL_MS]
    print_table(rows, columns)
    for row in rows:
        print(f"{row['engine']}: first tokens {row.get('first tokens')}")
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    params = {k: getattr(args, k) for k in ("threads", "new_tokens", "prefill_tokens", "rounds", "reps")}
    params["load average"] = os.getloadavg()[0]
    path = write_rows("cpu_inference", [{**params, "model": Path(args.model_dir).name, **r} for r in rows])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
