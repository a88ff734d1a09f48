"""Training through frozen NF4 projections: a projection without an adapter still passes the gradient to its input
(nf4_linear, both backends), any subset of target modules trains, and PEFT loads what it wrote.

Oracles: a dense fp32 model whose projections hold the dequantized NF4 weights, with the same LoRA factors
(gradients), and PEFT over transformers' Phi-3 (the adapter). Tolerances: test_kernels_nf4's one table (TOL).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import REL_TOL, VOCAB, make_tiny, rel_err
from phi3fast.kernels import nf4_linear, nf4_matmul
from test_kernels_nf4 import assert_close

from phi3fast.lora import LoraConfig, apply_lora, lora_parameters
from phi3fast.model import load
from phi3fast.quant import quantize_nf4
from phi3fast.train import TrainConfig, train

DATA = Path(__file__).parent / "data" / "train_memorize.jsonl"
BACKENDS = ("torch", "triton")  # 'triton' on CPU: Triton's interpreter (conftest.py), fp32
SUBSETS = [("qkv_proj",), ("down_proj",), ("o_proj", "gate_up_proj")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory)


# ---- the op ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("n,k", [(64, 128), (192, 64)])
def test_nf4_linear_gradient_matches_dequantized_fp32(backend: str, m: int, n: int, k: int) -> None:
    w = quantize_nf4(torch.randn(n, k))
    x = torch.randn(3, m, k, requires_grad=True)
    g = torch.randn(3, m, n)
    y = nf4_linear(x, w, backend)
    y.backward(g)
    xf = x.detach().clone().requires_grad_(True)
    ref = xf @ w.dequantize(torch.float32).t()
    ref.backward(g)
    assert y.shape == (3, m, n)
    assert_close(y, ref, torch.float32)
    assert_close(x.grad, xf.grad, torch.float32)
    for t in (w.packed, w.absmax, w.nested_absmax, w.code, w.nested_code, w.offset):
        assert not t.requires_grad and t.grad is None  # the frozen weight gets no gradient


def test_nf4_linear_without_autograd_is_nf4_matmul() -> None:
    w = quantize_nf4(torch.randn(64, 128))
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.equal(nf4_linear(x, w), nf4_matmul(x, w))
    assert torch.equal(nf4_linear(x, w), nf4_matmul(x, w))  # x needs no grad: no autograd node either
    y = nf4_linear(x.requires_grad_(True), w)
    assert y.grad_fn is not None and torch.equal(y.detach(), nf4_matmul(x.detach(), w))


# ---- a model with a subset of adapters -----------------------------------------------------------------------------


def _dense_twin(tiny: Path, model) -> torch.nn.Module:
    """A dense fp32 model holding model's dequantized NF4 weights and a copy of its LoRA factors."""
    twin = load(tiny, quantize=None)
    apply_lora(twin, model.lora_config)
    with torch.no_grad():
        for lin, ref in zip(model.linears().values(), twin.linears().values(), strict=True):
            ref.weight.copy_(lin.dense_weight(torch.float32))
            if lin.lora_A is not None:
                ref.lora_A.copy_(lin.lora_A)
                ref.lora_B.copy_(lin.lora_B)
    return twin


def _lora_grads(model, ids: torch.Tensor) -> list[torch.Tensor]:
    model.train()
    model(ids).float().logsumexp(-1).sum().backward()
    return [p.grad for p in lora_parameters(model)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("targets", SUBSETS, ids="+".join)
def test_subset_gradients_match_dequantized_fp32(tiny: Path, targets: tuple[str, ...], backend: str) -> None:
    """Adapters on some projections only: the gradient of the lowest ones crosses every frozen NF4 projection
    above them (the CPU reference used to fail there; Triton's nf4_matmul had no backward)."""
    model = load(tiny)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # nonzero B: every factor gets a gradient
    for lin in model.linears().values():
        lin.kernel_backend = backend
    ids = torch.randint(0, VOCAB, (2, 9))
    grads = _lora_grads(model, ids)
    want = _lora_grads(_dense_twin(tiny, model), ids)
    assert len(grads) == 2 * len(targets) * model.config.num_hidden_layers
    for got, ref in zip(grads, want, strict=True):
        assert got is not None and got.abs().sum() > 0
        assert_close(got, ref, torch.float32)
    assert all(
        p.grad is None for p in model.parameters() if not p.requires_grad
    )  # norms, embeddings, lm_head


@pytest.mark.parametrize("targets", [("qkv_proj",), ("down_proj",)], ids="+".join)
def test_train_a_subset_and_peft_loads_it(tiny: Path, tmp_path: Path, targets: tuple[str, ...]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(model=str(tiny), data=str(DATA), out=str(tmp_path / "out"), max_steps=12, batch_size=2,
                      seq_len=32, lr=1e-2, warmup=2, rank=4, alpha=8, dropout=0.0, save_every=0, dtype="fp32",
                      target_modules=targets, progress=False)  # fmt: skip
    result = train(cfg)
    assert result.steps == 12 and all(map(torch.isfinite, torch.tensor(result.losses)))
    assert sum(result.losses[-3:]) < sum(result.losses[:3])  # it learned through the frozen layers
    ids = torch.randint(0, VOCAB, (2, 17))
    ours = load(tiny, adapter=result.adapter, quantize=None)
    assert {n.rsplit(".", 1)[-1] for n, lin in ours.linears().items() if lin.lora_A is not None} == set(
        targets
    )
    hf = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(result.adapter)).eval()
    with torch.no_grad():
        a, b, base = ours(ids), peft_model(ids).logits, load(tiny, quantize=None)(ids)
    assert rel_err(a, b) < REL_TOL[torch.float32]
    assert (
        rel_err(a, base) > 10 * REL_TOL[torch.float32]
    )  # the adapter changes the output (the test can fail)


def test_cli_train_with_one_target_module(tiny: Path, tmp_path: Path) -> None:
    """The documented `--target-modules qkv_proj` on an NF4 base (it used to end in a traceback on CPU)."""
    from click.testing import CliRunner

    from phi3fast.cli import main

    args = ["train", "--model", str(tiny), "--data", str(DATA), "--out", str(tmp_path / "o"), "--max-steps", "2",
            "--batch-size", "1", "--seq-len", "16", "--rank", "2", "--dtype", "fp32", "--no-progress",
            "--target-modules", "qkv_proj"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert res.output.startswith("done: 2 steps") and (tmp_path / "o" / "adapter_model.safetensors").is_file()
