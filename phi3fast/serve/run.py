"""Load a model and serve it with uvicorn: the library side of `phi3fast serve`.

SIGTERM / Ctrl-C: uvicorn stops accepting connections, lets the requests in flight finish (streams included),
then the app's lifespan stops the engine. uvicorn re-raises the captured signal once it has shut down, which
would end the process with the signal's status; `_Server` drops that re-raise so a clean shutdown exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from phi3fast.errors import Phi3FastError


def _server_class() -> Any:
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return _Server


def run_server(
    model_dir: str | Path,
    *,
    adapters: dict[str, Path] | None = None,
    indexes: dict[str, Path] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_context: int | None = None,
    max_body: int = 4 * 1024 * 1024,
    quantize: str | None = "nf4",
    base_name: str | None = None,
    log_level: str = "info",
) -> None:
    """Load the base model once (plus each adapter and index) and serve until SIGTERM / SIGINT."""
    import uvicorn

    from phi3fast.model import load
    from phi3fast.serve.app import create_app
    from phi3fast.serve.service import Service

    model = load(model_dir, quantize=quantize)
    name = base_name or Path(str(model_dir).rstrip("/")).name
    if not name:
        raise Phi3FastError(f"cannot derive a model name from {model_dir!r}; give base_name")
    service = Service(
        model,
        name,
        adapters=adapters,
        indexes=indexes,
        max_batch=max_batch,
        max_queue=max_queue,
        max_context=max_context,
    )
    app = create_app(service, api_key=api_key, max_body=max_body)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
    _server_class()(config).run()
