"""The server's batched decode step through the native step: a mixed batch (prompts of three lengths, rows on
two adapters and on the base) gives the tokens the engine's torch path gives, with every step native; a model
carrying LoRA factors of its own takes the torch path for rows on a bank adapter and still decodes them right."""

from __future__ import annotations

import queue

import pytest
from model_helpers import make_tiny
from phi3fast.kernels import nf4_cpu
from serve_helpers import make_adapter

from phi3fast.model import load, native_decode
from phi3fast.model.chat import chat_prompt_ids
from phi3fast.serve.adapters import AdapterBank, read_adapter
from phi3fast.serve.engine import Engine, Job

pytestmark = pytest.mark.skipif(not nf4_cpu.available(), reason="native module built without the NF4 kernels")

N = 16
PROMPTS = ["Hi.", "Tell me a long story about a lighthouse keeper and the sea.", "What is two plus two?"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tiny = make_tiny(tmp_path_factory)
    root = tmp_path_factory.mktemp("native-serve")
    return {
        "tiny": tiny,
        "a": make_adapter(tiny, root / "a", r=3, seed=21),
        "b": make_adapter(tiny, root / "b", r=8, seed=22),
    }


def _collect(q: queue.Queue) -> list[int]:
    tokens = []
    while True:
        kind, value = q.get()
        if kind != "token":
            assert kind == "end", value
            return tokens
        tokens.append(value)


def _serve(files: dict, quantize: str | None, adapter: str | None = None) -> tuple[dict, Engine]:
    model = load(files["tiny"], quantize=quantize, adapter=files[adapter] if adapter else None)
    bank = AdapterBank(model)
    adapters = [None, read_adapter(model, "a", files["a"]), read_adapter(model, "b", files["b"])]
    engine = Engine(model, bank, max_batch=9, max_queue=0, max_context=256)
    queues = {}
    for prompt in PROMPTS:
        for a in adapters:
            q: queue.Queue = queue.Queue()
            ids = chat_prompt_ids(model, [{"role": "user", "content": prompt}])
            engine.submit(Job(ids, N, 0.0, 1.0, None, a, q.put))
            queues[(prompt, a.name if a else None)] = q
    engine.start()
    try:
        return {key: _collect(q) for key, q in queues.items()}, engine
    finally:
        engine.stop()


@pytest.mark.parametrize("quantize", ["nf4", None])
def test_native_batched_step_equals_the_torch_step(files: dict, quantize: str | None, monkeypatch) -> None:
    native, engine = _serve(files, quantize)
    assert engine.steps > 0 and engine.native_steps == engine.steps and engine.mixed_steps > 0
    with monkeypatch.context() as m:
        m.setattr(native_decode, "unsupported", lambda model: "the torch step, as the oracle")
        torch_rows, ref_engine = _serve(files, quantize)
    assert ref_engine.native_steps == 0
    assert native == torch_rows
    assert len({tuple(t) for t in native.values()}) > 3  # adapters and prompts made the rows differ


def test_own_lora_plus_bank_adapter_falls_back(files: dict, monkeypatch) -> None:
    native, engine = _serve(files, "nf4", adapter="a")
    assert engine.native_steps < engine.steps  # the steps with adapter rows ran on the torch path
    with monkeypatch.context() as m:
        m.setattr(native_decode, "unsupported", lambda model: "the torch step, as the oracle")
        torch_rows, _ = _serve(files, "nf4", adapter="a")
    assert native == torch_rows
