"""OpenAI-compatible embedders: a small server started here, driven through the official openai client (batching,
parallel requests, retries, errors, broken answers, the CLI end to end). Models that ship their own code:
test_embedders_remote_code.py."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from phi3fast.cli import main
from phi3fast.errors import Phi3FastError
from phi3fast.rag import Index
from phi3fast.rag.embedders import Embedder, canonical_name, load_embedder, shared_embedder
from phi3fast.rag.embedders import openai as oe

GOOD_KEY = "sk-test-good"
MODEL_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "tiny-embed": 256}

# ---------------------------------------------------------------------------------------------------------------
# The test server


def word_vector(text: str, dim: int) -> np.ndarray:
    """Deterministic bag-of-words vector: each lowercased word adds its own hash-seeded Gaussian vector, so texts
    sharing words are close and dense retrieval through the index means something. Not normalized (the client
    must normalize)."""
    v = np.zeros(dim)
    for w in re.findall(r"[a-z0-9]+", text.lower()):
        seed = int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little")
        v += np.random.default_rng(seed).standard_normal(dim)
    return 3.0 * v if v.any() else np.ones(dim)


@dataclass
class ServerState:
    fail_next: list[int] = field(default_factory=list)  # statuses to answer, one per call, before serving
    retry_after: str | None = None  # sent with the failures
    max_inputs: int = 2048  # the endpoint's limits, enforced like OpenAI's (400)
    max_words: int = 300_000
    corrupt: str | None = None  # "drop", "ragged", "zero", "dims": a broken answer
    delay: float = 0.0  # seconds per answer, to see requests overlap
    in_flight: int = 0
    max_in_flight: int = 0
    requests: list[dict] = field(default_factory=list)  # bodies of the requests that reached the handler
    auth: list[str | None] = field(default_factory=list)  # their Authorization headers
    waits: list[float] = field(default_factory=list)  # the client's backoff sleeps (not slept)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    state: ServerState

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass

    def _send(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error"}}, headers)

    def do_POST(self) -> None:  # noqa: N802
        st = self.state
        with st.lock:
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            time.sleep(st.delay)
            self._answer()
        finally:
            with st.lock:
                st.in_flight -= 1

    def _answer(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        st = self.state
        with st.lock:
            st.requests.append(body)
            st.auth.append(self.headers.get("Authorization"))
            status = st.fail_next.pop(0) if st.fail_next else None
        if self.path != "/v1/embeddings":
            return self._error(404, f"no route {self.path}")
        if status is not None:
            headers = {"Retry-After": st.retry_after} if st.retry_after else {}
            return self._error(status, "try again later", headers)
        if self.headers.get("Authorization") != f"Bearer {GOOD_KEY}":
            return self._error(401, "Incorrect API key provided")
        model, inputs = body["model"], body["input"]
        if model not in MODEL_DIMS:
            return self._error(404, f"The model `{model}` does not exist")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if len(inputs) > st.max_inputs or sum(len(t.split()) for t in inputs) > st.max_words:
            return self._error(400, "too many inputs or tokens in one request")
        if any(not t for t in inputs):
            return self._error(400, "'$.input' is invalid: empty string")
        dim = body.get("dimensions") or MODEL_DIMS[model]
        data = []
        for i, t in enumerate(inputs):
            v = word_vector(t, MODEL_DIMS[model])[:dim]
            data.append({"object": "embedding", "index": i, "embedding": v.tolist()})
        if st.corrupt == "drop":
            data.pop()
        elif st.corrupt == "ragged":
            data[-1]["embedding"].pop()
        elif st.corrupt == "zero":
            data[-1]["embedding"] = [0.0] * len(data[-1]["embedding"])
        elif st.corrupt == "dims":
            for d in data:
                d["embedding"].append(1.0)
        data.reverse()  # the order of `data` is not promised: the client must sort by index
        self._send(200, {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 0}})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, ServerState]]:
    state = ServerState()
    handler = type("H", (Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free one
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def api(server: tuple[str, ServerState], monkeypatch: pytest.MonkeyPatch) -> ServerState:
    """The environment pointing at the test server with a good key; a fresh request log; no real waits."""
    url, state = server
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", GOOD_KEY)
    state.fail_next.clear()
    state.requests.clear()
    state.retry_after = None
    state.max_inputs, state.max_words = 2048, 300_000
    state.delay, state.max_in_flight, state.corrupt = 0.0, 0, None
    state.waits = []
    monkeypatch.setattr(oe, "_sleep", state.waits.append)
    return state


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


TEXTS = [f"note {i}: the K{i % 7} pump needs oil grade {i % 5}" for i in range(17)] + ["", "x"]

# ---------------------------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint


def test_spec_parsing() -> None:
    assert canonical_name("openai:text-embedding-3-small") == "openai:text-embedding-3-small"
    assert canonical_name("openai:text-embedding-3-small?dimensions=0512") == (
        "openai:text-embedding-3-small?dimensions=512"
    )
    for bad, msg in [
        ("openai:", "give a model name"),
        ("openai:m?dims=3", "unknown option 'dims'"),
        ("openai:m?dimensions=x", "positive integer"),
        ("openai:m?dimensions=0", "positive integer"),
    ]:
        with pytest.raises(Phi3FastError, match=msg):
            canonical_name(bad)


def test_vectors_dimension_and_order(api: ServerState) -> None:
    emb = load_embedder("openai:tiny-embed")
    assert type(emb).__name__ == "OpenAIEmbedder" and isinstance(emb, Embedder)
    assert (emb.dim, emb.info.dim, emb.info.name) == (256, 256, "openai:tiny-embed")
    assert emb.max_seq_length == oe.MAX_TOKENS_PER_INPUT // 2
    api.requests.clear()
    vecs = emb.encode(TEXTS)
    assert vecs.dtype == np.float32 and vecs.shape == (len(TEXTS), 256) and vecs.flags.c_contiguous
    want = unit(np.stack([word_vector(t or " ", 256) for t in TEXTS]))
    np.testing.assert_allclose(vecs, want, rtol=0, atol=1e-6)  # float32 rounding of unit vectors
    assert len(api.requests) == 1 and api.requests[0]["encoding_format"] == "float"
    assert api.requests[0]["input"][-2] == " "  # the API refuses empty strings
    assert emb.encode([]).shape == (0, 256)


@pytest.mark.parametrize("model,dim", [("text-embedding-3-small", 1536), ("text-embedding-3-large", 3072)])
def test_dimension_comes_from_the_endpoint(api: ServerState, model: str, dim: int) -> None:
    assert load_embedder(f"openai:{model}").dim == dim
    short = load_embedder(f"openai:{model}?dimensions=256")
    assert short.dim == 256 and api.requests[-1]["dimensions"] == 256
    np.testing.assert_allclose(
        short.encode(["pump oil"])[0], unit(word_vector("pump oil", dim)[:256]), atol=1e-6
    )


@pytest.mark.parametrize("n,limit", [(1, 5), (5, 5), (17, 5), (130, 64)])
def test_batching_within_input_limit(
    api: ServerState, monkeypatch: pytest.MonkeyPatch, n: int, limit: int
) -> None:
    monkeypatch.setattr(oe, "MAX_INPUTS_PER_REQUEST", limit)
    monkeypatch.setattr(oe, "PARALLEL_REQUESTS", 1)  # requests reach the server in batch order
    api.max_inputs = limit  # the server refuses bigger requests, as OpenAI does past 2048
    emb = load_embedder("openai:tiny-embed")
    texts = [f"doc {i} about valve {i * 7}" for i in range(n)]
    api.requests.clear()
    batches = list(emb.encode_batches(texts, progress=False))
    sizes = [len(r["input"]) for r in api.requests]
    assert sizes == [len(b) for b in batches] and sum(sizes) == n
    assert len(sizes) == -(-n // limit) and max(sizes) <= limit
    np.testing.assert_allclose(
        np.concatenate(batches), unit(np.stack([word_vector(t, 256) for t in texts])), atol=1e-6
    )


def test_parallel_requests_keep_order(api: ServerState, monkeypatch: pytest.MonkeyPatch) -> None:
    emb = load_embedder("openai:tiny-embed")
    monkeypatch.setattr(oe, "MAX_INPUTS_PER_REQUEST", 2)
    texts = [f"item {i} of the list, word{i}" for i in range(13)]
    api.delay = 0.1  # long enough for the 4 client threads to overlap even on a busy machine
    api.requests.clear()
    vecs = emb.encode(texts)
    assert len(api.requests) == 7 and 2 <= api.max_in_flight <= oe.PARALLEL_REQUESTS
    np.testing.assert_allclose(vecs, unit(np.stack([word_vector(t, 256) for t in texts])), atol=1e-6)


def test_an_error_stops_the_other_requests(api: ServerState, monkeypatch: pytest.MonkeyPatch) -> None:
    emb = load_embedder("openai:tiny-embed")
    monkeypatch.setattr(oe, "MAX_INPUTS_PER_REQUEST", 1)
    api.delay = 0.02
    api.requests.clear()
    api.fail_next[:] = [403]  # not retried
    with pytest.raises(Phi3FastError, match="403 try again later"):
        emb.encode([f"t{i}" for i in range(20)])
    # The failing request was among the first PARALLEL_REQUESTS; at most that many more went out after it.
    assert len(api.requests) <= 2 * oe.PARALLEL_REQUESTS - 1
    # A request whose batch is abandoned stops retrying at its next failure.
    cancel = threading.Event()
    cancel.set()
    api.fail_next[:] = [503] * 3
    with pytest.raises(Phi3FastError, match=r"gave up after 1 attempt \(503"):
        emb._request(["x"], cancel)


def test_batching_within_token_budget(api: ServerState, monkeypatch: pytest.MonkeyPatch) -> None:
    emb = load_embedder("openai:tiny-embed")
    texts = ["alpha " * 30, "beta " * 5, "gamma " * 50, "delta", "epsilon " * 200, "zeta " * 10]
    monkeypatch.setattr(oe, "PROXY_TOKENS_PER_REQUEST", 60)
    monkeypatch.setattr(oe, "PARALLEL_REQUESTS", 1)  # requests reach the server in batch order
    api.requests.clear()
    emb.encode(texts)
    counts = [emb.count_tokens(t) + 2 for t in texts]  # what the batcher counts per input
    sent = [r["input"] for r in api.requests]
    assert [t for batch in sent for t in batch] == texts
    assert counts[4] > 60  # one input alone over the budget: it goes alone
    for batch, nxt in zip(sent, sent[1:] + [[]], strict=True):
        tokens = sum(counts[texts.index(t)] for t in batch)
        assert tokens <= 60 or len(batch) == 1  # within the budget...
        assert not nxt or tokens + counts[texts.index(nxt[0])] > 60  # ...and full: the next input did not fit
    assert [len(b) for b in sent] == [2, 2, 1, 1]


def test_retries_then_success(api: ServerState, capsys: pytest.CaptureFixture[str]) -> None:
    emb = load_embedder("openai:tiny-embed")
    api.requests.clear()
    api.fail_next[:] = [429, 500, 408, 503, 409, 502]
    vecs = emb.encode(["pump oil"])
    assert len(api.requests) == 7  # six failures, then the answer; the client itself did not retry
    np.testing.assert_allclose(vecs[0], unit(word_vector("pump oil", 256)), atol=1e-6)
    # Exponential, with jitter in the upper half of each step.
    for attempt, wait in enumerate(api.waits):
        step = oe.BASE_DELAY * 2**attempt
        assert step / 2 <= wait <= step
    assert len(api.waits) == 6
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 6 and warnings[0].startswith(
        "warning: embedder 'openai:tiny-embed' at http://127.0.0.1:"
    )
    assert warnings[0].endswith(
        f": 429 try again later; retry 1/{oe.MAX_ATTEMPTS - 1} in {api.waits[0]:.1f} s"
    )


def test_retry_after_is_honoured(api: ServerState) -> None:
    emb = load_embedder("openai:tiny-embed")
    api.fail_next[:] = [429]
    api.retry_after = "7"
    emb.encode(["x"])
    assert api.waits == [7.0]
    api.fail_next[:] = [429]
    api.retry_after = "3600"
    emb.encode(["x"])
    assert api.waits[-1] == oe.MAX_DELAY


def test_retries_exhausted(api: ServerState, monkeypatch: pytest.MonkeyPatch) -> None:
    emb = load_embedder("openai:tiny-embed")
    monkeypatch.setattr(oe, "MAX_ATTEMPTS", 3)
    api.requests.clear()
    api.fail_next[:] = [429] * 5
    with pytest.raises(Phi3FastError, match=r"gave up after 3 attempts \(429 try again later\)"):
        emb.encode(["x"])
    assert len(api.requests) == 3 and len(api.waits) == 2


def test_connection_refused_is_retried_then_reported(
    api: ServerState, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setattr(oe, "MAX_ATTEMPTS", 2)
    with pytest.raises(
        Phi3FastError, match=rf"127.0.0.1:{port}/v1: gave up after 2 attempts \(APIConnectionError"
    ):
        load_embedder("openai:tiny-embed")
    assert len(api.waits) == 1


def test_401_and_404_are_clear_and_not_retried(api: ServerState, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    api.requests.clear()
    with pytest.raises(
        Phi3FastError, match=r"401 unauthorized \(Incorrect API key provided\): check OPENAI_API_KEY"
    ):
        load_embedder("openai:tiny-embed")
    monkeypatch.setenv("OPENAI_API_KEY", GOOD_KEY)
    with pytest.raises(
        Phi3FastError, match=r"404 not found \(The model `nope` does not exist\): unknown model 'nope'"
    ):
        load_embedder("openai:nope")
    url = oe.endpoint_from_env()[0].removesuffix("/v1")
    monkeypatch.setenv("OPENAI_BASE_URL", url)  # forgot the /v1
    with pytest.raises(Phi3FastError, match=rf"at {re.escape(url)}: 404 .*wrong OPENAI_BASE_URL"):
        load_embedder("openai:tiny-embed")
    assert len(api.requests) == 3 and api.waits == []


@pytest.mark.parametrize(
    "corrupt,msg",
    [
        ("drop", r"answered 1 vectors for 2 inputs"),
        ("ragged", r"malformed vectors in the response"),
        ("zero", r"a zero or non-finite vector"),
        ("dims", r"returned 257-dim vectors, earlier 256-dim"),
    ],
)
def test_broken_answers_are_refused(api: ServerState, corrupt: str, msg: str) -> None:
    emb = load_embedder("openai:tiny-embed")
    api.corrupt = corrupt
    with pytest.raises(Phi3FastError, match=msg):
        emb.encode(["a b", "c d"])


def test_other_4xx_is_reported(api: ServerState) -> None:
    emb = load_embedder("openai:tiny-embed")
    api.max_inputs = 1
    with pytest.raises(Phi3FastError, match=r"openai:tiny-embed' at .*: 400 too many inputs"):
        emb.encode(["a", "b"])


def test_keys_and_missing_client(monkeypatch: pytest.MonkeyPatch, server: tuple[str, ServerState]) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(Phi3FastError, match="calls https://api.openai.com/v1: set OPENAI_API_KEY"):
        load_embedder("openai:text-embedding-3-small")
    # A local server without a key: a placeholder is sent (our server says 401 to it, a keyless one would not).
    monkeypatch.setenv("OPENAI_BASE_URL", server[0])
    with pytest.raises(Phi3FastError, match="401"):
        load_embedder("openai:tiny-embed")
    assert server[1].auth[-1] == f"Bearer {oe.PLACEHOLDER_KEY}"
    monkeypatch.setitem(sys.modules, "openai", None)  # as if not installed
    with pytest.raises(Phi3FastError, match=r"pip install 'phi3fast\[openai\]'"):
        load_embedder("openai:tiny-embed")


def test_shared_follows_the_endpoint(
    api: ServerState, server: tuple[str, ServerState], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = shared_embedder("openai:tiny-embed")
    assert shared_embedder("openai:tiny-embed?") is a and a.client.base_url.host == "127.0.0.1"
    monkeypatch.setenv("OPENAI_BASE_URL", server[0].replace("127.0.0.1", "localhost"))
    b = shared_embedder("openai:tiny-embed")  # another endpoint: another client
    assert b is not a and b.client.base_url.host == "localhost"


# ---------------------------------------------------------------------------------------------------------------
# The index and the CLI with an openai: embedder

DOCS = {
    "pumps.md": "# Pumps\n\nThe centrifugal pump P-12 needs oil grade ISO VG 46 every 500 hours.\n",
    "valves.md": "# Valves\n\nThe relief valve V-7 opens at 12 bar; test it monthly with the hand lever.\n",
    "belts.md": "# Belts\n\nReplace the drive belt B-3 when the tension gauge reads below 40 newton.\n",
}


def test_cli_index_and_query_end_to_end(api: ServerState, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    out = tmp_path / "idx"
    runner = CliRunner()
    r = runner.invoke(main, ["index", str(docs), "--out", str(out), "--embedder", "openai:tiny-embed"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["embedder"]["name"] == "openai:tiny-embed" and manifest["embedder"]["dim"] == 256
    assert manifest["chunks"] == 3

    r = runner.invoke(
        main,
        ["query", "which relief valve opens at 12 bar", "--index", str(out), "--json", "--mode", "dense"],
    )
    assert r.exit_code == 0, r.output
    results = json.loads(r.output)["results"]
    assert results[0]["source"] == "valves.md"
    assert results[0]["score"] == pytest.approx(
        float(
            unit(word_vector("which relief valve opens at 12 bar", 256))
            @ unit(word_vector("Valves\n" + DOCS["valves.md"].split("\n\n", 1)[1].strip(), 256))
        ),
        abs=1e-5,
    )

    # Another embedder (the default one) is refused before anything loads.
    r = runner.invoke(main, ["query", "oil", "--index", str(out), "--embedder", "all-MiniLM-L6-v2"])
    assert r.exit_code == 2 and "built with embedder 'openai:tiny-embed'" in r.output
    with pytest.raises(Phi3FastError, match="cannot be searched with 'all-MiniLM-L6-v2'"):
        Index.open(out, embedder="all-MiniLM-L6-v2")
    assert Index.open(out, embedder="openai:tiny-embed").search("belt tension", k=1)[0].source == "belts.md"
    # The endpoint's errors reach the CLI as one line.
    r = runner.invoke(main, ["index", str(docs), "--out", str(tmp_path / "i2"), "--embedder", "openai:nope"])
    assert r.exit_code == 2 and r.output.startswith("error: embedder 'openai:nope' at ") and "404" in r.output


def test_chunk_tokens_window(api: ServerState, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "long.md").write_text("# Long\n\n" + " ".join(f"word{i}" for i in range(3000)) + "\n")
    index = Index.build(
        [docs], tmp_path / "idx", embedder="openai:tiny-embed", chunk_tokens=1024, progress=False
    )
    assert index.manifest["chunk_tokens"] == 1024 and index.manifest["embedder"]["max_seq_length"] == 4095
    emb = index.embedder
    assert all(emb.count_tokens(r.text) <= 1024 for r in index.search("word17", k=50, mode="keyword"))
    with pytest.raises(Phi3FastError, match="exceeds the 4095-token window"):
        Index.build(
            [docs], tmp_path / "idx2", embedder="openai:tiny-embed", chunk_tokens=5000, progress=False
        )
