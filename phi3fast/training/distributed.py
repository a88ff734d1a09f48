"""Data parallelism for `torchrun --nproc-per-node N -m phi3fast train ...`.

Design note: every rank holds the frozen base and the same LoRA weights, computes the summed loss of its own
micro-batches of each global batch, and the LoRA gradients are summed across ranks with one all_reduce per
optimizer step. Each loss is divided by the target count of the WHOLE global batch (which every rank knows, as
it sees the same data order), so the summed gradient is exactly that of one process running all the micro-batches
with grad_accum N. LoRA gradients are a few MB, so one flat all_reduce per step costs less than DDP's per-bucket
hooks would buy in overlap, and it needs no no_sync() bookkeeping across accumulation steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init() -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); NCCL on
    GPU, gloo on CPU. Without torchrun: one process on cuda:0 or the CPU."""
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method="env://", timeout=timedelta(minutes=30)
        )
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(rank, world, local_rank, device)


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor across ranks in place, through one flat buffer (one collective per call)."""
    if not tensors or not dist.is_initialized():
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if flag is set on any rank (all ranks must stop at the same step when one is signalled)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_across(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Copy rank 0's values to every rank (LoRA init, so ranks never drift even if their RNGs differ)."""
    if not dist.is_initialized():
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)


def all_gather_object(obj: Any) -> list[Any]:
    """obj from every rank, in rank order (RNG states for a checkpoint)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
