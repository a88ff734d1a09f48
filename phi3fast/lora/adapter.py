"""LoRA adapters on phi3fast's Phi-3: which projections get one, with what rank and scale.

Each targeted `Phi3Linear` gets A [r, in] (Kaiming-uniform, as PEFT) and B [out, r] (zeros) from its own
`add_lora`, kept in fp32 (the forward casts them to the compute dtype), and computes
x W^T + (alpha / r) * dropout(x) A^T B^T. They are the only trainable parameters. PEFT I/O: peft_io.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from phi3fast.errors import Phi3FastError

if TYPE_CHECKING:
    from phi3fast.model.phi3 import Phi3ForCausalLM

# Phi-3's decoder projections (the module names of its checkpoints), every one a LoRA target.
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = TARGETS
    use_rslora: bool = False  # PEFT's rank-stabilized scale alpha / sqrt(r), accepted when an adapter uses it

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise Phi3FastError(f"LoRA rank must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise Phi3FastError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.target_modules if t not in TARGETS]
        if bad or not self.target_modules:
            raise Phi3FastError(
                f"LoRA target modules must be among {', '.join(TARGETS)}; got {list(self.target_modules)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def apply_lora(model: Phi3ForCausalLM, cfg: LoraConfig) -> None:
    """Freeze the model and add LoRA factors to every targeted projection."""
    if model.lora_config is not None:
        raise Phi3FastError("the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in model.linears().items():
        if name.rsplit(".", 1)[-1] in cfg.target_modules:
            lin.add_lora(cfg.r, cfg.scale, cfg.dropout)
    model.lora_config = cfg


def lora_parameters(model: Phi3ForCausalLM) -> list[nn.Parameter]:
    """The trainable parameters: every LoRA A and B, in module order."""
    params = []
    for lin in model.linears().values():
        if lin.lora_A is not None:
            params += [lin.lora_A, lin.lora_B]
    return params
