"""`phi3fast serve`: an OpenAI-compatible server over one base model, many LoRA adapters and RAG indexes.

service.py (what a request does) · engine.py (continuous batching) · adapters.py (per-row LoRA) · kvpool.py
(per-sequence KV slots) · retrieval.py (RAG per request) · schemas.py (validation) · app.py (HTTP) · run.py
(uvicorn) · page/ (the chat page).
"""

from __future__ import annotations

from typing import Any


def run_server(*args: Any, **kwargs: Any) -> None:
    from phi3fast.serve.run import run_server as _run

    _run(*args, **kwargs)


__all__ = ["run_server"]
