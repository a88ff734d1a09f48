"""Activation memory a LoRA training step keeps per decoder layer: torch row-wise ops vs the fused kernels.

    python bench/rowwise_memory.py [--variants phi-3-mini,phi-3-medium] [--tokens 32]

One Phi-3 decoder layer at the real sizes (frozen fp16 weights, LoRA r=16 on every projection, the project's
default LoRA config) runs forward once with backend='torch' and once with backend='triton' (on a CPU-only machine
the Triton kernels run in Triton's interpreter: the bytes are real, the time is meaningless and not reported).
A saved_tensors hook records every tensor autograd keeps for backward; the row counts the distinct storages
(weights and LoRA factors excluded), divided by the number of tokens: the activation bytes per token per layer,
which times layers x tokens is what a step holds without gradient checkpointing. fp16 stands in for bf16 (same
bytes; the interpreter cannot compute in bf16). Both paths run the in-place RoPE (the model always does), so the
difference is RMSNorm's fp32 copy of its input (the kernel keeps the 16-bit input and 4 bytes of inverse RMS per
row instead) and SwiGLU's saved silu(gate). The totals include what the device's SDPA kernel keeps (on CPU its
math path).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before phi3fast.kernels imports triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_rows  # noqa: E402

from phi3fast.lora import LoraConfig, apply_lora  # noqa: E402
from phi3fast.model import Phi3ForCausalLM  # noqa: E402
from phi3fast.model.config import REGISTRY, Phi3Config  # noqa: E402


def one_layer_model(variant: str, dtype: torch.dtype, device: torch.device) -> Phi3ForCausalLM:
    v = REGISTRY[variant]
    cfg = Phi3Config(
        variant=variant, vocab_size=64, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_hidden_layers=1, num_attention_heads=v.num_attention_heads, num_key_value_heads=v.num_key_value_heads,
    )  # fmt: skip
    model = Phi3ForCausalLM(cfg)
    for lin in model.linears().values():
        lin.set_base(torch.randn(lin.out_features, lin.in_features) * lin.in_features**-0.5)
    model.to(device=device, dtype=dtype)
    apply_lora(model, LoraConfig())
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)  # nonzero B so the LoRA branch is exercised
    return model


def saved_bytes(model: Phi3ForCausalLM, backend: str, tokens: int) -> tuple[int, torch.Tensor]:
    """(bytes of distinct non-parameter storages autograd keeps for one layer's backward, layer output)."""
    model.set_kernel_backend(backend)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    torch.manual_seed(0)
    h = torch.randn(1, tokens, model.config.hidden_size, dtype=model.dtype, device=model.device)
    h.requires_grad_()  # a middle layer: its input carries gradient
    pos = torch.arange(tokens, device=model.device)[None]
    cos, sin = model.rotary(pos, h.dtype)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.layers[0](h, cos, sin, None, True)
    out.float().square().mean().backward()  # the graph is complete and runs
    return sum(storages.values()), out.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="phi-3-mini-4k,phi-3-medium-4k")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    rows = []
    for variant in args.variants.split(","):
        print(f"{variant}: building one layer, running torch and triton paths", file=sys.stderr, flush=True)
        model = one_layer_model(variant, dtype, device)
        (torch_b, ref), (fused_b, out) = (saved_bytes(model, b, args.tokens) for b in ("torch", "triton"))
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        rows.append({
            "variant": variant, "tokens": args.tokens, "dtype": str(dtype).removeprefix("torch."),
            "torch_KB_per_token": torch_b / args.tokens / 1024, "fused_KB_per_token": fused_b / args.tokens / 1024,
            "diff_KB_per_token": (torch_b - fused_b) / args.tokens / 1024,
            "saved_pct": 100 * (1 - fused_b / torch_b), "out_rel_err": err,
        })  # fmt: skip
    columns = ["variant", "tokens", "dtype", "torch_KB_per_token", "fused_KB_per_token", "diff_KB_per_token"]
    print_table(rows, [*columns, "saved_pct", "out_rel_err"])
    print(f"wrote {write_rows('rowwise_memory', rows)}")


if __name__ == "__main__":
    main()
