"""phi3fast serve through the official `openai` client against a real uvicorn server: models, greedy answers equal
to phi3fast.generate's (base and two adapters, batched together), streaming, seeds, stop strings, RAG sources
with query's prompt, embeddings, and adapters added and removed live."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from model_helpers import make_tiny  # noqa: E402
from serve_helpers import BASE, ThreadServer, httpx, make_adapter, make_index  # noqa: E402

from phi3fast.generate import generate_text  # noqa: E402
from phi3fast.model import load  # noqa: E402
from phi3fast.model.chat import chat_prompt_ids  # noqa: E402
from phi3fast.rag.answer import AnswerConfig, cited, stream_answer  # noqa: E402
from phi3fast.serve.service import Service  # noqa: E402

N = 24
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about pumps."}]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tiny = make_tiny(tmp_path_factory)
    root = tmp_path_factory.mktemp("serve")
    return {
        "tiny": tiny,
        "a": make_adapter(tiny, root / "adapter-a", r=4, seed=1),
        "b": make_adapter(tiny, root / "adapter-b", r=6, seed=2),  # another rank: the bank pads ranks
        "docs": make_index(root),
    }


@pytest.fixture(scope="module")
def server(files: dict):
    service = Service(
        load(files["tiny"]),
        BASE,
        adapters={"a": files["a"], "b": files["b"]},
        indexes={"docs": files["docs"]},
        max_batch=4,
        max_queue=4,
    )
    srv = ThreadServer(service, max_body=64 * 1024)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ThreadServer):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(files: dict) -> dict:
    """What phi3fast generate answers (greedy, N tokens) with the base and with each adapter, loaded alone."""
    out = {}
    for name, adapter in ((BASE, None), ("a", files["a"]), ("b", files["b"])):
        model = load(files["tiny"], adapter=adapter)
        out[name] = generate_text(model, MESSAGES, max_new_tokens=N)
    # The test means something only if the adapters change the answer.
    assert len({out[BASE], out["a"], out["b"]}) == 3, out
    return out


def test_models_lists_base_and_adapters(client) -> None:
    assert [m.id for m in client.models.list().data] == [BASE, "a", "b"]


def test_health(server: ThreadServer) -> None:
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == BASE


@pytest.mark.parametrize("model", [BASE, "a", "b"])
def test_greedy_equals_generate(client, reference: dict, files: dict, model: str) -> None:
    c = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=N)
    assert c.choices[0].message.content == reference[model]
    assert c.model == model and c.object == "chat.completion"
    tiny = load(files["tiny"])
    prompt = chat_prompt_ids(tiny, MESSAGES)
    assert c.usage.prompt_tokens == len(prompt)
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert 1 <= c.usage.completion_tokens <= N
    assert c.choices[0].finish_reason == ("length" if c.usage.completion_tokens == N else "stop")


def _stream(client, model: str, out: dict, **kw: object) -> None:
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=N, stream=True, **kw
    )
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    out[model] = ("".join(pieces), finish)


def test_two_adapters_stream_in_one_batch(
    client, server: ThreadServer, reference: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = server.service.engine
    mixed_before = engine.mixed_steps
    # The first admitted request's prefill waits until the other two are queued, so they join it while it still
    # decodes, however fast a step is or however loaded the machine (without this the batch depends on timing).
    prefill_all, first = engine._prefill_all, threading.Event()

    def prefill_when_all_queued(jobs: list) -> None:
        if jobs and not first.is_set():
            first.set()
            deadline = time.monotonic() + 120
            while len(engine._waiting) < 3 - len(jobs) and time.monotonic() < deadline:
                time.sleep(0.005)
        prefill_all(jobs)

    monkeypatch.setattr(engine, "_prefill_all", prefill_when_all_queued)
    out: dict = {}
    threads = [threading.Thread(target=_stream, args=(client, m, out)) for m in ("a", "b", BASE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for m in ("a", "b", BASE):
        assert out[m][0] == reference[m], m
        assert out[m][1] in ("stop", "length")
    # Steps whose batch held rows of two or more adapters: the adapters really shared decode steps.
    assert engine.mixed_steps > mixed_before


def test_stream_raw_events_end_with_done(server: ThreadServer, reference: dict) -> None:
    body = {"model": "a", "messages": MESSAGES, "temperature": 0, "max_tokens": N, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == reference["a"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


def test_seeded_sampling_is_reproducible_and_matches_generate(client, files: dict) -> None:
    kw = {"model": BASE, "messages": MESSAGES, "temperature": 0.9, "top_p": 0.8, "seed": 7, "max_tokens": N}
    first = client.chat.completions.create(**kw).choices[0].message.content
    second = client.chat.completions.create(**kw).choices[0].message.content
    assert first == second
    expect = generate_text(
        load(files["tiny"]), MESSAGES, max_new_tokens=N, temperature=0.9, top_p=0.8, seed=7
    )
    assert first == expect


def test_stop_string_cuts_the_answer(client, reference: dict, files: dict) -> None:
    full = reference[BASE]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "the reference answer is too short to pick a stop string"
    c = client.chat.completions.create(
        model=BASE, messages=MESSAGES, temperature=0, max_tokens=N, stop=[stop]
    )
    assert c.choices[0].message.content == full[: full.index(stop)]
    assert c.choices[0].finish_reason == "stop"
    # Streaming holds back a partial stop string, so it never reaches the client either.
    out: dict = {}
    _stream(client, BASE, out, stop=stop)
    assert out[BASE] == (full[: full.index(stop)], "stop")


def test_rag_answers_with_query_prompt_and_sources(client, files: dict) -> None:
    from phi3fast.rag import Index

    question = "What oil does the pump need?"
    c = client.chat.completions.create(
        model="a",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=N,
        extra_body={"rag": {"index": "docs", "k": 3}},
    )
    results = Index.open(files["docs"]).search(question, k=3)
    model = load(files["tiny"], adapter=files["a"])
    kept, pieces = stream_answer(model, question, results, AnswerConfig(max_new_tokens=N))
    answer = "".join(pieces)
    assert c.choices[0].message.content == answer
    sources = c.model_extra["sources"]
    assert [s["index"] for s in sources] == list(range(1, len(kept) + 1))
    assert [(s["source"], s["heading"], s["start"], s["end"]) for s in sources] == [
        (r.source, r.heading, r.start, r.end) for r in kept
    ]
    assert [s["score"] for s in sources] == pytest.approx([r.score for r in kept])
    assert [s["text"] for s in sources] == [r.text for r in kept]
    used = cited(answer, len(kept))
    assert [s["cited"] for s in sources] == [i in used for i in range(1, len(kept) + 1)]


def test_rag_streaming_sends_sources_in_the_last_chunk(server: ThreadServer) -> None:
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": "How do I reset the pump?"}],
        "max_tokens": 8,
        "stream": True,
        "rag": {"index": "docs", "k": 2},
    }
    import json

    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    last = events[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert len(last["sources"]) == 2 and {"source", "heading", "start", "end", "score", "cited"} <= set(
        last["sources"][0]
    )


def test_embeddings_use_the_index_embedder(client, server: ThreadServer, files: dict) -> None:
    from phi3fast.rag import Index

    texts = ["pump maintenance", "warranty claims take 30 days"]
    expect = np.asarray(Index.open(files["docs"]).embedder.encode(texts), dtype=np.float32)
    r = client.embeddings.create(model="docs", input=texts)  # the SDK asks for base64 and decodes it
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
    assert r.usage.prompt_tokens > 0
    raw = httpx.post(
        server.url + "/v1/embeddings", json={"model": "docs", "input": texts[0], "encoding_format": "float"}
    ).json()
    np.testing.assert_allclose(np.array(raw["data"][0]["embedding"]), expect[0], rtol=1e-5, atol=1e-6)


def test_adapter_added_and_removed_live(client, server: ThreadServer, reference: dict, files: dict) -> None:
    # A stream on adapter a runs while adapter c is added and b removed; its answer is not disturbed.
    body = {"model": "a", "messages": MESSAGES, "temperature": 0, "max_tokens": N, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        it = r.iter_lines()
        first = next(line for line in it if line)
        added = httpx.post(server.url + "/v1/adapters", json={"name": "c", "path": str(files["b"])})
        assert added.status_code == 201 and added.json()["id"] == "c"
        removed = httpx.delete(server.url + "/v1/adapters/b")
        assert removed.status_code == 200 and removed.json()["deleted"] is True
        lines = [first, *[line for line in it if line]]
    import json

    chunks = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == reference["a"]
    assert [m.id for m in client.models.list().data] == [BASE, "a", "c"]
    c = client.chat.completions.create(model="c", messages=MESSAGES, temperature=0, max_tokens=N)
    assert c.choices[0].message.content == reference["b"]  # c is b's files under another name
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="b", messages=MESSAGES, max_tokens=2)
    # Put things back for the other tests of this module.
    assert (
        httpx.post(server.url + "/v1/adapters", json={"name": "b", "path": str(files["b"])}).status_code
        == 201
    )
    assert httpx.delete(server.url + "/v1/adapters/c").status_code == 200
