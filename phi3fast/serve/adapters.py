"""The adapter bank: many PEFT LoRA adapters over one base model, applied per batch row.

The base model carries no LoRA of its own. A forward hook on each of its Phi3Linear modules adds, for the rows
of adapter i, s_i (x A_i^T) B_i^T to the base output. For a step the engine sets a plan: the adapters present in
the batch stacked per module (ranks zero-padded to the largest, index 0 a zero adapter for base rows) and each
row's index into that stack; the hook gathers A/B per row and runs two batched matmuls, so rows on different
adapters share one forward pass.

Adapters are immutable once loaded. Adding or removing one swaps the name table under a lock; a sequence keeps
the entry it was admitted with, so in-flight requests are not disturbed by either.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from phi3fast.errors import Phi3FastError
from phi3fast.lora.peft_io import read_adapter_config, read_adapter_weights

if TYPE_CHECKING:
    from phi3fast.model import Phi3ForCausalLM, Phi3Linear

_PEFT_PREFIX = "base_model.model.model."


@dataclass(frozen=True, eq=False)
class Adapter:
    name: str
    path: str
    rank: int
    # module name -> (A [r, in], B [out, r] pre-multiplied by the LoRA scale), in the model's dtype and device
    weights: dict[str, tuple[Tensor, Tensor]] = field(repr=False)


def read_adapter(model: Phi3ForCausalLM, name: str, adapter_dir: str | Path) -> Adapter:
    """Load a PEFT LoRA adapter for `model`'s projections; every tensor must match a module's shape."""
    path = Path(adapter_dir)
    cfg = read_adapter_config(path)
    weights, sd = read_adapter_weights(path)
    linears = model.linears()
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in sd.items():
        if not key.startswith(_PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise Phi3FastError(f"{weights}: unexpected tensor {key!r} (not a LoRA A/B of the model)")
        module, ab = key[len(_PEFT_PREFIX) :].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        if module not in linears:
            raise Phi3FastError(f"{weights}: {key!r} names no projection of the model")
        pairs.setdefault(module, {})[ab] = t
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for module, ab in pairs.items():
        lin = linears[module]
        a, b = ab.get("lora_A"), ab.get("lora_B")
        if a is None or b is None:
            raise Phi3FastError(f"{weights}: {module} has only one of lora_A / lora_B")
        if tuple(a.shape) != (cfg.r, lin.in_features) or tuple(b.shape) != (lin.out_features, cfg.r):
            raise Phi3FastError(
                f"{weights}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; the model needs "
                f"A ({cfg.r}, {lin.in_features}) and B ({lin.out_features}, {cfg.r})"
            )
        dtype, device = model.dtype, model.device
        out[module] = (
            a.to(device, dtype).contiguous(),
            (b.float() * cfg.scale).to(device, dtype).contiguous(),
        )
    if not out:
        raise Phi3FastError(f"{weights}: no LoRA tensors in it")
    return Adapter(name=name, path=str(path), rank=cfg.r, weights=out)


@dataclass(frozen=True)
class _Stack:
    a: Tensor  # [n + 1, r_max, in]; row 0 zeros (base rows)
    b: Tensor  # [n + 1, out, r_max]


class AdapterBank:
    """Named adapters plus the forward hooks that apply them per batch row."""

    def __init__(self, model: Phi3ForCausalLM) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._by_name: dict[str, Adapter] = {}
        self._linears: dict[str, Phi3Linear] = model.linears()
        self._plan: tuple[Tensor, dict[str, _Stack]] | None = None  # set by the engine thread only
        self._stacks_key: tuple[int, ...] = ()
        self._stacks: dict[str, _Stack] = {}
        for name, lin in self._linears.items():
            lin.register_forward_hook(self._hook(name))

    # ---- the name table (any thread) --------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return list(self._by_name)

    def get(self, name: str) -> Adapter | None:
        with self._lock:
            return self._by_name.get(name)

    def add(self, adapter: Adapter) -> None:
        with self._lock:
            if adapter.name in self._by_name:
                raise Phi3FastError(f"adapter {adapter.name!r} already exists")
            self._by_name = {**self._by_name, adapter.name: adapter}

    def remove(self, name: str) -> Adapter | None:
        with self._lock:
            table = dict(self._by_name)
            gone = table.pop(name, None)
            self._by_name = table
            return gone

    # ---- per-step plan (engine thread) -------------------------------------------------------------------------

    def set_rows(self, rows: list[Adapter | None]) -> None:
        """Adapter of each batch row for the next forward pass (None = the base)."""
        distinct: list[Adapter] = []
        for a in rows:
            if a is not None and a not in distinct:
                distinct.append(a)
        if not distinct:
            self._plan = None
            return
        key = tuple(id(a) for a in distinct)
        if key != self._stacks_key:
            self._stacks = self._stack(distinct)
            self._stacks_key = key
        pos = {id(a): i + 1 for i, a in enumerate(distinct)}
        idx = torch.tensor([0 if a is None else pos[id(a)] for a in rows], device=self.model.device)
        self._plan = (idx, self._stacks)

    def clear_rows(self) -> None:
        self._plan = None

    def _stack(self, adapters: list[Adapter]) -> dict[str, _Stack]:
        stacks = {}
        dtype, device = self.model.dtype, self.model.device
        for module, lin in self._linears.items():
            present = [a for a in adapters if module in a.weights]
            if not present:
                continue
            r = max(a.weights[module][0].shape[0] for a in present)
            sa = torch.zeros((len(adapters) + 1, r, lin.in_features), dtype=dtype, device=device)
            sb = torch.zeros((len(adapters) + 1, lin.out_features, r), dtype=dtype, device=device)
            for i, a in enumerate(adapters, 1):
                if module in a.weights:
                    wa, wb = a.weights[module]
                    sa[i, : wa.shape[0]] = wa
                    sb[i, :, : wb.shape[1]] = wb
            stacks[module] = _Stack(sa, sb)
        return stacks

    def _hook(self, module: str):  # noqa: ANN202
        def hook(_mod: torch.nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
            plan = self._plan
            if plan is None:
                return None
            idx, stacks = plan
            stack = stacks.get(module)
            if stack is None:
                return None
            x = inputs[0]  # [B, T, in]
            t = torch.bmm(x, stack.a[idx].transpose(1, 2))  # [B, T, r]
            return out + torch.bmm(t, stack.b[idx].transpose(1, 2))

        return hook
