"""phi3fast serve under load: 1, 4 and 16 concurrent streaming clients (the `openai` SDK) against a real server
process on 127.0.0.1, with continuous batching (--max-batch 16) and one request at a time (--max-batch 1) in the
same run, on the same prompts.

Per run: aggregate completion tokens/s (all clients' tokens over the wall time), time to first token p50/p95
(client side: request sent -> first content chunk), and the errors clients saw. The queue limit is above the
number of clients, so every error counts as a failure (the script exits 1).

    python bench/serve.py --model /path/to/smollm2-phi3 [--clients 1,4,16] [--max-tokens 64] [--requests 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REAL_MODEL, print_table, write_rows  # noqa: E402

DEFAULT_MODEL = str(REAL_MODEL)  # `make demo` makes it
TOPICS = ["lighthouses", "volcanoes", "bees", "glaciers", "trains", "coral reefs", "bridges", "comets",
          "forests", "deserts", "rivers", "castles", "owls", "tides", "windmills", "caves"]  # fmt: skip


def start_server(
    model: str, max_batch: int, max_queue: int, extra: list[str]
) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "phi3fast", "serve", "--model", model, "--port", "0",
           "--max-batch", str(max_batch), "--max-queue", str(max_queue), *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "Uvicorn running on" in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, line.split("Uvicorn running on", 1)[1].split()[0]
    raise SystemExit(f"server exited with {proc.wait()} before listening")


def one_request(client, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:  # noqa: ANN001
    """(seconds to the first content chunk, completion tokens) of one streamed request."""
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


def run_clients(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    ttfts: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
        for j in range(requests):
            prompt = f"Write a long, detailed essay about {TOPICS[(i + j) % len(TOPICS)]}."
            try:
                ttft, n = one_request(client, model, prompt, max_tokens)
                with lock:
                    ttfts.append(ttft)
                    tokens.append(n)
            except Exception as e:  # what a client sees under load: counted, reported, and fails the bench
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(ttfts, n=20, method="inclusive") if len(ttfts) > 1 else ttfts * 19
    return {
        "clients": clients,
        "requests": clients * requests,
        "completion_tokens": sum(tokens),
        "wall_s": wall,
        "tokens_per_s": sum(tokens) / wall,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan"),
        "ttft_p95_s": q[18] if ttfts else float("nan"),
        "errors": len(errors),
        "error_samples": errors[:3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16, help="the batching server's --max-batch")
    ap.add_argument("--quantize", default="nf4", choices=["nf4", "none"])
    ap.add_argument("--out", default="serve")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    if not Path(args.model).is_dir():
        raise SystemExit(f"{args.model}: no such checkpoint directory (give --model)")
    name = Path(args.model).name
    rows = []
    for mode, max_batch in (("batching", args.max_batch), ("one-at-a-time", 1)):
        # The queue holds every client: no request may be shed, so any error is a failure.
        proc, url = start_server(args.model, max_batch, max(counts) + 1, ["--quantize", args.quantize])
        try:
            run_clients(url, name, 1, 1, 8)  # warm-up (first-call allocations)
            for c in counts:
                row = {"mode": mode, "max_batch": max_batch, "model": name, "max_tokens": args.max_tokens}
                row.update(run_clients(url, name, c, args.requests, args.max_tokens))
                row["loadavg_1min"] = os.getloadavg()[0]  # other jobs on the machine: context for the figures
                rows.append(row)
                print_table([row], ["mode", "clients", "requests", "completion_tokens", "tokens_per_s",
                                    "ttft_p50_s", "ttft_p95_s", "errors"])  # fmt: skip
        finally:
            proc.terminate()
            proc.wait()
    print()
    print_table(rows, ["mode", "clients", "tokens_per_s", "ttft_p50_s", "ttft_p95_s", "errors"])
    for c in counts:
        b = next(r for r in rows if r["mode"] == "batching" and r["clients"] == c)
        s = next(r for r in rows if r["mode"] == "one-at-a-time" and r["clients"] == c)
        print(
            f"{c:>2} clients: batching / one-at-a-time tokens/s = {b['tokens_per_s'] / s['tokens_per_s']:.2f}x"
        )
    print(write_rows(args.out, rows))
    if any(r["errors"] for r in rows):
        raise SystemExit("clients saw errors below the queue limit")


if __name__ == "__main__":
    main()
