"""`openai:MODEL` embedders: any OpenAI-compatible /v1/embeddings endpoint, through the official `openai` client.

The endpoint is OPENAI_BASE_URL (default https://api.openai.com/v1) with the key OPENAI_API_KEY; a local server
(vLLM, llama.cpp, Ollama, text-embeddings-inference...) may need no key, and then a placeholder is sent, since
the client refuses to run without one. The spec may ask for shortened vectors:
`openai:text-embedding-3-small?dimensions=512`.

Chunking tokenizer
------------------
Chunking needs each token's character span, and there is no local tokenizer for OpenAI's models (tiktoken would
download its vocabulary). The bundled all-MiniLM-L6-v2 WordPiece tokenizer stands in. Its 30k vocabulary splits
rare English words into more pieces than cl100k's 100k one, which errs on the safe side; but a script it lacks
collapses to one [UNK] per word and counts fewer tokens than the endpoint will. Hence the margins: an input may be
up to half the endpoint's per-input limit in proxy tokens, and a request carries up to half its per-request token
limit. Chunks are 128 proxy tokens unless --chunk-tokens says otherwise.

Failures
--------
429 (also 408 and 409), 5xx, timeouts and refused connections are retried with exponential backoff and jitter by
our own loop (the client's retries are off, so the attempt count and delays are ours to state and test). 401,
404 and other 4xx are the user's to fix: one line naming the endpoint, no retry.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from phi3fast.errors import ArgumentError, Phi3FastError
from phi3fast.rag.embedders.base import OPENAI_PREFIX, Embedder, bundled_model_path, token_spans

if TYPE_CHECKING:
    import openai

# Endpoint limits, from OpenAI's embeddings API reference (text-embedding-3-*, ada-002):
MAX_INPUTS_PER_REQUEST = 2048  # "any array must be 2048 dimensions or less"
MAX_TOKENS_PER_REQUEST = 300_000  # "a maximum of 300,000 tokens summed across all inputs in a single request"
MAX_TOKENS_PER_INPUT = 8191  # the models' input window
# Budgets in proxy (MiniLM) tokens: half the limits, see "Chunking tokenizer" above.
PROXY_TOKENS_PER_REQUEST = MAX_TOKENS_PER_REQUEST // 2
PROXY_MAX_SEQ_LENGTH = MAX_TOKENS_PER_INPUT // 2

# Retries: 6 waits of ~0.5, 1, 2, 4, 8, 16 s (half of each random) ride out a minute-long rate-limit window.
MAX_ATTEMPTS = 7
BASE_DELAY = 0.5
MAX_DELAY = 30.0  # also caps a server's Retry-After
# Retried besides 5xx and connection errors: timeout, conflict (a transient lock) and rate limit, as in the
# openai client's own policy.
RETRY_STATUSES = (408, 409, 429)
# 4 requests in flight: the endpoint's latency, not our CPU, bounds throughput; more mostly buys 429s.
PARALLEL_REQUESTS = 4
TIMEOUT = 120.0  # seconds per request: 2048 inputs on a busy endpoint can take tens of seconds

PLACEHOLDER_KEY = "no-key"  # sent to a local server when OPENAI_API_KEY is unset
DEFAULT_BASE_URL = "https://api.openai.com/v1"

_sleep = time.sleep  # tests replace it to record the backoff without waiting


@dataclass(frozen=True)
class OpenAISpec:
    model: str
    dimensions: int | None = None

    @classmethod
    def parse(cls, spec: str) -> OpenAISpec:
        """'openai:MODEL' or 'openai:MODEL?dimensions=N'."""
        assert spec.startswith(OPENAI_PREFIX)
        model, _, query = spec[len(OPENAI_PREFIX) :].partition("?")
        if not model.strip() or model != model.strip():
            raise ArgumentError("embedder", f"{spec}: give a model name, e.g. openai:text-embedding-3-small")
        dimensions = None
        for opt in filter(None, query.split("&")):
            key, _, value = opt.partition("=")
            if key != "dimensions":
                raise ArgumentError("embedder", f"{spec}: unknown option '{key}' (only dimensions=N)")
            if not value.isdigit() or int(value) < 1:
                raise ArgumentError(
                    "embedder", f"{spec}: dimensions must be a positive integer, got '{value}'"
                )
            dimensions = int(value)
        return cls(model, dimensions)

    @property
    def name(self) -> str:
        """The normal form recorded in the index."""
        return OPENAI_PREFIX + self.model + (f"?dimensions={self.dimensions}" if self.dimensions else "")


def endpoint_from_env() -> tuple[str | None, str | None]:
    """(OPENAI_BASE_URL, OPENAI_API_KEY) as set, empty counting as unset."""
    return os.environ.get("OPENAI_BASE_URL") or None, os.environ.get("OPENAI_API_KEY") or None


def backoff_delay(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (0-based): BASE_DELAY * 2^attempt, the upper half
    of it random ("equal jitter": many clients rate-limited together do not retry in step), at least the
    server's Retry-After, at most MAX_DELAY."""
    step = min(MAX_DELAY, BASE_DELAY * 2.0**attempt)
    delay = step / 2 + random.uniform(0, step / 2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, MAX_DELAY)


def _retry_after(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: rare for APIs, the backoff alone will do
        return None


def _server_message(err: openai.APIStatusError) -> str:
    body = err.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        msg = inner.get("message") if isinstance(inner, dict) else None
        if msg:
            return " ".join(str(msg).split())
    return " ".join(str(err.message).split())


class OpenAIEmbedder(Embedder):
    """An OpenAI-compatible embeddings endpoint. Thread-safe: the client is; the proxy tokenizer has a lock.
    Batches go out PARALLEL_REQUESTS at a time and come back in input order."""

    def __init__(self, name: str) -> None:
        """name: 'openai:MODEL[?dimensions=N]'."""
        try:
            import openai
        except ImportError:
            raise Phi3FastError(
                f"embedder '{name}' needs the openai client: pip install 'phi3fast[openai]'"
            ) from None
        from tokenizers import Tokenizer

        self._openai = openai
        self.spec = OpenAISpec.parse(name)
        self.name = self.spec.name
        self.trust_remote_code = False
        base_url, api_key = endpoint_from_env()
        if api_key is None and base_url is None:
            raise Phi3FastError(
                f"embedder '{self.name}' calls {DEFAULT_BASE_URL}: set OPENAI_API_KEY "
                "(or OPENAI_BASE_URL for a local OpenAI-compatible server)"
            )
        # max_retries=0: the client's own retries would multiply ours (see "Failures" above).
        self.client = openai.OpenAI(
            api_key=api_key or PLACEHOLDER_KEY,
            base_url=base_url or DEFAULT_BASE_URL,
            max_retries=0,
            timeout=TIMEOUT,
        )
        self.base_url = str(self.client.base_url).rstrip("/")
        self._lock = threading.Lock()
        self.tokenizer = Tokenizer.from_file(os.path.join(bundled_model_path(), "tokenizer.json"))
        self.max_seq_length = PROXY_MAX_SEQ_LENGTH
        self.dim = 0  # set by the probe: the dimension is whatever the endpoint returns
        # One tiny request learns the dimension, and fails early, before any chunking, on a bad key/model/URL.
        self.dim = self._request(["dimension probe"]).shape[1]

    def token_offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        with self._lock:
            return token_spans(self.tokenizer, texts)

    # -- requests --
    def _request(self, texts: list[str], cancel: threading.Event | None = None) -> np.ndarray:
        """One /embeddings call with retries: unit float32 vectors [len(texts), dim], in input order. A set
        `cancel` stops the retrying (another batch has failed)."""
        openai = self._openai
        where = f"embedder '{self.name}' at {self.base_url}"
        # The API refuses empty strings; a blank text embeds as one space (no text to match, like any model).
        inputs = [t if t.strip() else " " for t in texts]
        kwargs = {"dimensions": self.spec.dimensions} if self.spec.dimensions else {}
        for attempt in range(MAX_ATTEMPTS):
            try:
                resp = self.client.embeddings.create(
                    model=self.spec.model, input=inputs, encoding_format="float", **kwargs
                )
                break
            except openai.APIStatusError as e:
                status = e.status_code
                if status == 401:
                    raise Phi3FastError(
                        f"{where}: 401 unauthorized ({_server_message(e)}): check OPENAI_API_KEY"
                    ) from None
                if status == 404:
                    raise Phi3FastError(
                        f"{where}: 404 not found ({_server_message(e)}): unknown model '{self.spec.model}' or "
                        "wrong OPENAI_BASE_URL (it usually ends in /v1)"
                    ) from None
                if status not in RETRY_STATUSES and status < 500:
                    # 400 (an input too long...), 403, 422: retrying will not help
                    raise Phi3FastError(f"{where}: {status} {_server_message(e)}") from None
                what = f"{status} {_server_message(e)}"
                err: Exception = e
            except openai.APIConnectionError as e:  # refused, reset, DNS, and timeouts (a subclass)
                what = f"{type(e).__name__}: {e}"
                err = e
            n = attempt + 1
            if n == MAX_ATTEMPTS or (cancel is not None and cancel.is_set()):
                raise Phi3FastError(
                    f"{where}: gave up after {n} attempt{'s' if n > 1 else ''} ({what})"
                ) from None
            delay = backoff_delay(attempt, _retry_after(err))
            # A rate-limited run can stall for a while: say why, on stderr like the index's warnings.
            print(f"warning: {where}: {what}; retry {n}/{MAX_ATTEMPTS - 1} in {delay:.1f} s", file=sys.stderr)
            _sleep(delay)
        data = sorted(resp.data, key=lambda d: d.index)
        if [d.index for d in data] != list(range(len(texts))):
            raise Phi3FastError(
                f"{where}: answered {len(data)} vectors for {len(texts)} inputs (or repeated an index)"
            )
        try:
            vecs = np.array([d.embedding for d in data], dtype=np.float64)
        except (TypeError, ValueError):
            vecs = np.zeros(0)
        if vecs.ndim != 2 or vecs.shape[1] == 0:
            raise Phi3FastError(f"{where}: malformed vectors in the response (ragged, empty or not numbers)")
        if self.dim and vecs.shape[1] != self.dim:
            raise Phi3FastError(f"{where}: returned {vecs.shape[1]}-dim vectors, earlier {self.dim}-dim")
        if self.spec.dimensions and vecs.shape[1] != self.spec.dimensions:
            raise Phi3FastError(
                f"{where}: asked for dimensions={self.spec.dimensions}, got {vecs.shape[1]} (the model or server "
                "may not support shortened vectors)"
            )
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise Phi3FastError(f"{where}: returned a zero or non-finite vector")
        return np.ascontiguousarray(vecs / norms, dtype=np.float32)

    def _batches(self, texts: list[str]) -> Iterator[list[str]]:
        """Consecutive runs of texts within the per-request input and (proxy) token budgets."""
        # +2 per input: a margin, like a model's special tokens.
        counts = [len(o) + 2 for o in self.token_offsets(texts)]
        start, tokens = 0, 0
        for i, n in enumerate(counts):
            if i > start and (i - start == MAX_INPUTS_PER_REQUEST or tokens + n > PROXY_TOKENS_PER_REQUEST):
                yield texts[start:i]
                start, tokens = i, 0
            tokens += n
        if start < len(texts):
            yield texts[start:]

    # -- the Embedder interface --
    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(list(self.encode_batches(texts, progress=False)))

    def encode_batches(self, texts: list[str], progress: bool = True) -> Iterator[np.ndarray]:
        """One request per batch, PARALLEL_REQUESTS in flight, yielded in order, with a tqdm bar in chunks/s."""
        from tqdm import tqdm

        batches = self._batches(texts)
        cancel = threading.Event()
        pool = ThreadPoolExecutor(PARALLEL_REQUESTS, thread_name_prefix="openai-embed")
        pending: deque[Future[np.ndarray]] = deque()
        try:
            with tqdm(
                total=len(texts), unit="chunks", desc="embedding", disable=not progress, leave=False
            ) as bar:
                for batch in itertools.islice(batches, PARALLEL_REQUESTS):
                    pending.append(pool.submit(self._request, batch, cancel))
                while pending:
                    vecs = pending.popleft().result()
                    batch = next(batches, None)
                    if batch is not None:
                        pending.append(pool.submit(self._request, batch, cancel))
                    bar.update(len(vecs))
                    yield vecs
        finally:
            # On an error (or the caller stopping early) the requests still in flight give up at their next
            # retry instead of holding the process for minutes of backoff.
            cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
