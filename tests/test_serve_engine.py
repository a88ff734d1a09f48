"""The engine without HTTP: prompts of different lengths on different adapters decoded in one batch (padded caches,
per-row positions, per-row LoRA) give the tokens phi3fast.generate gives each alone; stop strings and the
incremental decoder."""

from __future__ import annotations

import queue

import pytest
from model_helpers import make_tiny
from serve_helpers import make_adapter

from phi3fast.generate import generate_tokens
from phi3fast.model import load
from phi3fast.model.chat import chat_prompt_ids, stop_ids
from phi3fast.serve.adapters import AdapterBank, read_adapter
from phi3fast.serve.engine import Engine, Job, QueueFull
from phi3fast.serve.text import IncrementalDecoder, StopMatcher

N = 20
PROMPTS = ["Hi.", "Tell me a long story about a lighthouse keeper and the sea.", "What is two plus two?"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tiny = make_tiny(tmp_path_factory)
    root = tmp_path_factory.mktemp("engine")
    return {
        "tiny": tiny,
        "a": make_adapter(tiny, root / "a", r=3, seed=11),
        "b": make_adapter(tiny, root / "b", r=8, seed=12),
    }


def _collect(q: queue.Queue) -> tuple[list[int], str]:
    tokens = []
    while True:
        kind, value = q.get()
        if kind == "token":
            tokens.append(value)
        else:
            assert kind == "end", value
            return tokens, value


def test_mixed_batch_equals_generate_alone(files: dict) -> None:
    model = load(files["tiny"])
    bank = AdapterBank(model)
    adapters = [None, read_adapter(model, "a", files["a"]), read_adapter(model, "b", files["b"])]
    engine = Engine(model, bank, max_batch=8, max_queue=0, max_context=512)
    jobs = []
    # Every prompt on every adapter: 9 rows of 3 lengths and 3 adapters. Submitted before the engine starts, so
    # all are admitted together and share every decode step until each finishes.
    for prompt in PROMPTS:
        for adapter in adapters:
            q: queue.Queue = queue.Queue()
            ids = chat_prompt_ids(model, [{"role": "user", "content": prompt}])
            job = Job(ids, N, 0.0, 1.0, None, adapter, q.put)
            jobs.append((prompt, adapter, q, job))
    with pytest.raises(QueueFull):  # 8 slots and no queue: the 9th is refused
        for _, _, _, job in jobs:
            engine.submit(job)
    jobs = jobs[:8]
    engine.start()
    try:
        got = {(p, a.name if a else None): _collect(q) for p, a, q, _ in jobs}
    finally:
        engine.stop()
    assert engine.mixed_steps > 0
    for (prompt, name), (tokens, reason) in got.items():
        ref = load(files["tiny"], adapter=files[name] if name else None)
        ids = chat_prompt_ids(ref, [{"role": "user", "content": prompt}])
        expect = list(generate_tokens(ref, ids, max_new_tokens=N, stop=stop_ids(ref)))
        assert tokens == expect, (prompt, name)
        assert reason == ("length" if len(expect) == N else "stop")


def test_cancelled_job_leaves_and_others_continue(files: dict) -> None:
    model = load(files["tiny"])
    engine = Engine(model, AdapterBank(model), max_batch=4, max_queue=4, max_context=512)
    ids = chat_prompt_ids(model, [{"role": "user", "content": PROMPTS[1]}])
    q1: queue.Queue = queue.Queue()
    q2: queue.Queue = queue.Queue()
    gone = Job(ids, 400, 0.0, 1.0, None, None, q1.put)
    stays = Job(ids, N, 0.0, 1.0, None, None, q2.put)
    gone.cancel()  # its client went away before it was admitted
    engine.submit(gone)
    engine.submit(stays)
    engine.start()
    try:
        tokens, _ = _collect(q2)
    finally:
        engine.stop()
    assert q1.empty()
    assert tokens == list(generate_tokens(model, ids, max_new_tokens=N, stop=stop_ids(model)))


@pytest.mark.parametrize(
    ("pieces", "stops", "sent", "hit"),
    [
        (["Hello wor", "ld, bye"], ["world"], "Hello ", True),
        (["ab", "c", "d"], ["cd", "x"], "ab", True),
        (["abc"], ["cd"], "abc", False),  # 'c' is held until the text settles, then flushed
        (["a", "b"], [], "ab", False),
        (["x<|", "stop|>y"], ["<|stop|>"], "x", True),
    ],
)
def test_stop_matcher(pieces: list[str], stops: list[str], sent: str, hit: bool) -> None:
    m = StopMatcher(stops)
    out, stopped = [], False
    for p in pieces:
        text, stopped = m.feed(p)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    assert ("".join(out), stopped) == (sent, hit)


def test_incremental_decoder_matches_decode(files: dict) -> None:
    tok = load(files["tiny"]).tokenizer
    ids = tok("Grüße, naïve café — ok", add_special_tokens=False)["input_ids"]
    d = IncrementalDecoder(tok)
    text = "".join(d.push(t) for t in ids) + d.finish()
    assert text == tok.decode(ids, skip_special_tokens=True)
