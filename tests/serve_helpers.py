"""Shared by the server tests: tiny adapters with nonzero random LoRA weights (PEFT format), a small RAG index,
and a real uvicorn server on 127.0.0.1 (an OS-chosen free port) in a thread or a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch

try:  # the HTTP client the openai SDK ships with (httpx's successor), for raw requests
    import httpx2 as httpx
except ImportError:  # older openai releases depend on httpx itself
    import httpx  # type: ignore[no-redef]

from phi3fast.lora import LoraConfig, apply_lora, save_adapter
from phi3fast.model import load
from phi3fast.serve.app import create_app
from phi3fast.serve.run import _server_class
from phi3fast.serve.service import Service

BASE = "tiny"
__all__ = [
    "BASE",
    "ThreadServer",
    "httpx",
    "make_adapter",
    "make_index",
    "serve_subprocess",
    "stop_subprocess",
]


def make_adapter(tiny: Path, out: Path, r: int, seed: int) -> Path:
    """A PEFT adapter over `tiny` with random A and B (B nonzero, unlike a fresh init), big enough to change
    the greedy answer."""
    model = load(tiny, quantize="nf4")
    apply_lora(model, LoraConfig(r=r, alpha=2 * r, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in model.linears().values():
            lin.lora_A.copy_(torch.randn(lin.lora_A.shape, generator=g) * 0.3)
            lin.lora_B.copy_(torch.randn(lin.lora_B.shape, generator=g) * 0.3)
    return save_adapter(model, out)


def make_index(root: Path) -> Path:
    from rag_helpers import CHUNK_TOKENS, OVERLAP, small_corpus

    from phi3fast.rag import Index

    corpus = small_corpus(root / "corpus")
    out = root / "docs.idx"
    Index.build([corpus], out, chunk_tokens=CHUNK_TOKENS, overlap=OVERLAP, progress=False)
    return out


class ThreadServer:
    """create_app over a Service, served by uvicorn in a thread; `.url` is http://127.0.0.1:PORT."""

    def __init__(self, service: Service, **app_kwargs: object) -> None:
        import uvicorn

        self.service = service
        config = uvicorn.Config(
            create_app(service, **app_kwargs), host="127.0.0.1", port=0, log_level="warning", lifespan="on"
        )
        self.server = _server_class()(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        started = threading.Event()
        while not self.server.started and self.thread.is_alive():
            started.wait(0.02)
        assert self.server.started, "uvicorn did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()


def serve_subprocess(args: list[str]) -> tuple[subprocess.Popen, str]:
    """`phi3fast serve ARGS --port 0` in a child process; returns it and its base URL once it listens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "phi3fast", "serve", *args, "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "Uvicorn running on" in line:  # uvicorn prints the bound address, with the OS-chosen port
            url = line.split("Uvicorn running on", 1)[1].split()[0]
            # Keep reading its log so a full pipe never blocks the server.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, url
    proc.wait()
    raise AssertionError(f"server exited ({proc.returncode}) before listening")


def stop_subprocess(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait()
