"""The thread policy of a CPU training step (phi3fast.training.threads): torch's glue on one thread, the native
NF4 kernels and the loss's large GEMMs on every thread torch had."""

from __future__ import annotations

import pytest
import torch
from phi3fast.kernels import nf4_cpu

from phi3fast.training.threads import all_threads, glue_threads

pytestmark = pytest.mark.skipif(not nf4_cpu.available(), reason="native NF4 kernels not built")


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def test_glue_threads_pins_the_native_pool_and_restores(two_threads) -> None:
    with glue_threads(torch.device("cpu")):
        assert torch.get_num_threads() == 1
        assert nf4_cpu._threads(None) == 2
        with all_threads():
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    assert nf4_cpu._threads(None) == 2


def test_all_threads_outside_glue_changes_nothing(two_threads) -> None:
    with all_threads():
        assert torch.get_num_threads() == 2


def test_glue_threads_restores_after_an_error(two_threads) -> None:
    with pytest.raises(RuntimeError), glue_threads(torch.device("cpu")):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    with all_threads():
        assert torch.get_num_threads() == 2


def test_trainer_step_runs_under_the_policy(tmp_path, monkeypatch, two_threads) -> None:
    """A training step's forward sees one torch thread; the cross-entropy sees both."""
    from pathlib import Path

    from phi3fast.model.tiny import init_tiny
    from phi3fast.train import TrainConfig, train
    from phi3fast.training import trainer

    seen: dict[str, int] = {}
    real_ce = trainer.chunked_cross_entropy

    def ce(*args, **kw):
        seen["ce"] = torch.get_num_threads()
        return real_ce(*args, **kw)

    monkeypatch.setattr(trainer, "chunked_cross_entropy", ce)
    from phi3fast.model import phi3

    real_norm = phi3.rms_norm

    def norm(*args, **kw):
        seen["norm"] = torch.get_num_threads()
        return real_norm(*args, **kw)

    monkeypatch.setattr(phi3, "rms_norm", norm)
    model = init_tiny(tmp_path / "m", hidden=64, layers=1, heads=4, intermediate=128, vocab=512)
    data = Path(__file__).parent / "data" / "train_memorize.jsonl"
    cfg = TrainConfig(model=str(model), data=str(data), out=str(tmp_path / "out"), max_steps=1, batch_size=1,
                      seq_len=16, rank=4, alpha=8, save_every=0, dtype="fp32", progress=False, quantize="nf4")  # fmt: skip
    train(cfg)
    assert seen == {"ce": 2, "norm": 1}
    assert torch.get_num_threads() == 2


def test_long_prompt_attention_and_dense_gemms_get_every_thread(tmp_path, monkeypatch, two_threads) -> None:
    """generate pins torch's small ops to one thread; a long prompt's attention and dense projections get both
    threads back (nf4_cpu.full_threads), a short prompt's do not."""
    import torch.nn.functional as F

    from phi3fast.generate import generate_tokens
    from phi3fast.model import load, phi3
    from phi3fast.model.tiny import init_tiny

    seen: dict[str, list[int]] = {"sdpa": [], "linear": []}
    real_sdpa, real_linear = F.scaled_dot_product_attention, F.linear

    def sdpa(*args, **kw):
        seen["sdpa"].append(torch.get_num_threads())
        return real_sdpa(*args, **kw)

    def linear(*args, **kw):
        seen["linear"].append(torch.get_num_threads())
        return real_linear(*args, **kw)

    monkeypatch.setattr(phi3.F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(phi3.F, "linear", linear)
    path = init_tiny(tmp_path / "m", hidden=64, layers=1, heads=4, intermediate=128, vocab=512)
    model = load(path, quantize=None)
    list(generate_tokens(model, list(range(3, 133)), max_new_tokens=1))  # a 130-token prompt
    assert seen["sdpa"] == [2] and set(seen["linear"]) == {2}
    seen["sdpa"].clear()
    seen["linear"].clear()
    list(generate_tokens(model, [3, 4, 5], max_new_tokens=1))
    assert seen["sdpa"] == [1] and set(seen["linear"]) == {1}
