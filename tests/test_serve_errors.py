"""Bad input gets OpenAI's error shape and the right status, and the server stays up: 400 (malformed JSON,
wrong types, context_length_exceeded), 404 (model, index, adapter), 401 (--api-key), 413 (body), 429 (full)."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from model_helpers import make_tiny  # noqa: E402
from serve_helpers import BASE, ThreadServer, httpx, make_adapter  # noqa: E402

from phi3fast.model import load  # noqa: E402
from phi3fast.serve.service import Service  # noqa: E402

KEY = "sk-test-123"
MAX_BODY = 16 * 1024
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def server(tiny):
    srv = ThreadServer(Service(load(tiny), BASE, max_batch=2, max_queue=1, max_context=64), max_body=MAX_BODY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ThreadServer):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _alive(server: ThreadServer) -> None:
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b"\xff\xfe", b""],
    ids=["malformed", "array", "not-utf8", "empty"],
)
def test_malformed_json_is_400(server: ThreadServer, body: bytes) -> None:
    r = httpx.post(
        server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert _error(r, 400)["type"] == "invalid_request_error"
    _alive(server)


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("temperature", "hot", "temperature"),
        ("temperature", 2.5, "temperature"),
        ("top_p", 0, "top_p"),
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", 1.5, "max_tokens"),
        ("stream", "yes", "stream"),
        ("stop", [1], "stop"),
        ("seed", "7", "seed"),
        ("messages", [], "messages"),
        ("messages", [{"role": "robot", "content": "hi"}], "messages[0].role"),
        ("messages", [{"role": "user", "content": 3}], "messages[0].content"),
        ("model", 5, "model"),
        ("rag", {"k": 2}, "rag.index"),
        ("rag", {"index": "docs", "k": 0}, "rag.k"),
        ("n", 2, "n"),
    ],
)
def test_wrong_types_are_400_naming_the_field(
    server: ThreadServer, field: str, value: object, param: str
) -> None:
    body = {"model": BASE, "messages": HELLO, "max_tokens": 2, field: value}
    err = _error(httpx.post(server.url + "/v1/chat/completions", json=body), 400)
    assert err["param"] == param
    _alive(server)


def test_null_fields_mean_not_given(server: ThreadServer) -> None:
    body = {"model": BASE, "messages": HELLO, "max_tokens": 2, "n": None, "stream": None, "stop": None,
            "temperature": None, "seed": None, "rag": None, "stream_options": None}  # fmt: skip
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_sdk_raises_bad_request(client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=HELLO, temperature=-1)
    assert e.value.status_code == 400


def test_prompt_longer_than_context_is_context_length_exceeded(client, server: ThreadServer) -> None:
    long = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=long, max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    # Prompt plus an explicit max_tokens past the context: the same error, before any work.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=HELLO, max_tokens=500)
    assert e.value.code == "context_length_exceeded"
    _alive(server)


def test_unknown_model_index_adapter_are_404(client, server: ThreadServer) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=HELLO, max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=BASE, messages=HELLO, extra_body={"rag": {"index": "nope"}})
    assert e.value.code == "index_not_found"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    assert _error(httpx.delete(server.url + "/v1/adapters/nope"), 404)["code"] == "adapter_not_found"
    assert _error(httpx.get(server.url + "/v1/nothing-here"), 404)["type"] == "not_found_error"
    _alive(server)


def test_bad_adapter_post_is_400(server: ThreadServer, tmp_path) -> None:
    r = httpx.post(server.url + "/v1/adapters", json={"name": "x", "path": str(tmp_path / "missing")})
    assert "adapter_config.json" in _error(r, 400)["message"]
    assert _error(httpx.post(server.url + "/v1/adapters", json={"name": "x"}), 400)["param"] == "path"
    r = httpx.post(server.url + "/v1/adapters", json={"name": BASE, "path": str(tmp_path)})
    assert "base model" in _error(r, 400)["message"]
    _alive(server)


def test_oversized_body_is_413(server: ThreadServer) -> None:
    big = {"model": BASE, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 1)}]}
    assert _error(httpx.post(server.url + "/v1/chat/completions", json=big), 413)
    # Without a Content-Length (chunked upload) the limit holds too.
    chunks = iter([b'{"model": "tiny", "messages": "', b"x" * (MAX_BODY + 1), b'"}'])
    r = httpx.post(server.url + "/v1/chat/completions", content=chunks)
    assert _error(r, 413)
    _alive(server)


def test_api_key_is_enforced(tiny, tmp_path) -> None:
    adapter = make_adapter(tiny, tmp_path / "ad", r=2, seed=3)
    srv = ThreadServer(Service(load(tiny), BASE, max_context=64), api_key=KEY)
    try:
        for key in ("wrong", None):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            for method, path, body in [
                ("GET", "/v1/models", None),
                ("POST", "/v1/chat/completions", {"model": BASE, "messages": HELLO}),
                ("POST", "/v1/embeddings", {"model": "x", "input": "x"}),
                ("POST", "/v1/adapters", {"name": "x", "path": str(adapter)}),
                ("DELETE", "/v1/adapters/x", None),
            ]:
                r = httpx.request(method, srv.url + path, json=body, headers=headers)
                assert _error(r, 401)["type"] == "authentication_error", (method, path)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in good.models.list().data] == [BASE]
        c = good.chat.completions.create(model=BASE, messages=HELLO, max_tokens=2, temperature=0)
        assert c.usage.completion_tokens >= 1
        assert httpx.get(srv.url + "/health").status_code == 200  # health needs no key
        assert httpx.get(srv.url + "/").status_code == 200  # nor the page (it asks for the key)
    finally:
        srv.stop()
