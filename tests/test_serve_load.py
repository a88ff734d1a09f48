"""Load behaviour: a full server answers 429 and keeps serving, a client that disconnects mid-stream frees its
slot, and SIGTERM finishes the request in flight and exits 0 (the server in a subprocess)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from model_helpers import make_tiny  # noqa: E402
from serve_helpers import BASE, ThreadServer, httpx, serve_subprocess, stop_subprocess  # noqa: E402

from phi3fast.generate import generate_tokens  # noqa: E402
from phi3fast.model import load  # noqa: E402
from phi3fast.model.chat import chat_prompt_ids, stop_ids  # noqa: E402
from phi3fast.serve.service import Service  # noqa: E402

MESSAGES = [{"role": "user", "content": "Count to a hundred."}]
LONG = 300  # tokens: many decode steps, so the request is surely still running when the test acts on it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    path = make_tiny(tmp_path_factory)
    model = load(path)
    tokens = list(
        generate_tokens(model, chat_prompt_ids(model, MESSAGES), max_new_tokens=LONG, stop=stop_ids(model))
    )
    assert len(tokens) == LONG, "the tiny model stops early on this prompt; pick another one"
    return path


@pytest.fixture
def one_slot(tiny):
    """One running sequence and no queue: a second request while one runs gets 429."""
    srv = ThreadServer(Service(load(tiny), BASE, max_batch=1, max_queue=0, max_context=512))
    yield srv
    srv.stop()


def _body(max_tokens: int, stream: bool) -> dict:
    return {"model": BASE, "messages": MESSAGES, "temperature": 0, "max_tokens": max_tokens, "stream": stream}


def _wait_for(srv: ThreadServer, ready, what: str) -> None:  # noqa: ANN001
    """Until ready(health) holds (each poll waits on the server's reply; bounded in polls, not in time)."""
    event = threading.Event()
    for _ in range(10_000):
        h = httpx.get(srv.url + "/health").json()
        if ready(h):
            return
        event.wait(0.005)
    raise AssertionError(f"the engine never became {what}: {h}")


def _wait_idle(srv: ThreadServer) -> None:
    _wait_for(srv, lambda h: h["running"] == 0 and h["queued"] == 0, "idle")


def test_full_server_sheds_load_with_429_and_stays_up(one_slot: ThreadServer) -> None:
    client = openai.OpenAI(base_url=one_slot.url + "/v1", api_key="x", max_retries=0)
    with httpx.stream("POST", one_slot.url + "/v1/chat/completions", json=_body(LONG, True)) as r:
        lines = r.iter_lines()  # kept: a dropped line iterator closes the response
        assert next(lines)  # the first chunk: the request holds the only slot
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(**_body(2, False))
        assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    c = client.chat.completions.create(**_body(2, False))
    assert c.usage.completion_tokens == 2


def test_disconnect_mid_stream_frees_the_slot(one_slot: ThreadServer) -> None:
    engine = one_slot.service.engine
    steps = engine.steps
    with httpx.stream("POST", one_slot.url + "/v1/chat/completions", json=_body(LONG, True)) as r:
        lines = r.iter_lines()
        assert next(lines)
    # The response is closed: the server notices, cancels the sequence, and the slot is free again long before
    # the LONG tokens the request asked for were generated.
    _wait_idle(one_slot)
    assert engine.steps - steps < LONG - 1
    client = openai.OpenAI(base_url=one_slot.url + "/v1", api_key="x", max_retries=0)
    assert client.chat.completions.create(**_body(3, False)).usage.completion_tokens == 3


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_slot(
    one_slot: ThreadServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = one_slot.service.engine
    steps = engine.steps
    # Decode steps wait until the client has hung up, then take 10 ms each (a native step of the tiny model takes
    # well under one): the hang-up is seen within 3 s of steps, however fast or loaded the machine.
    hung_up, decode_step = threading.Event(), engine._decode_step

    def slow_step() -> None:
        hung_up.wait(120)
        time.sleep(0.01)
        decode_step()

    monkeypatch.setattr(engine, "_decode_step", slow_step)
    # A non-streaming client that hangs up once its request is running, before the answer is complete.
    body = json.dumps(_body(LONG, False)).encode()
    host, port = one_slot.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    _wait_for(one_slot, lambda h: h["running"] == 1, "busy")
    sock.close()
    hung_up.set()
    _wait_idle(one_slot)
    assert engine.steps - steps < LONG - 1


def test_sigterm_finishes_in_flight_and_exits_0(tiny) -> None:
    proc, url = serve_subprocess(["--model", str(tiny), "--max-context", "512", "--max-batch", "2"])
    try:
        body = {**_body(LONG, True), "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            it = (line for line in r.iter_lines() if line)
            first = next(it)
            proc.send_signal(signal.SIGTERM)  # mid-stream: the answer must still arrive whole
            lines = [first, *it]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line[6:]) for line in lines[:-1]]
        assert events[-1]["usage"]["completion_tokens"] == LONG  # the whole answer, after SIGTERM
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            stop_subprocess(proc)
