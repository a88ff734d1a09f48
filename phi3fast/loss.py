"""Chunked cross-entropy over hidden states and the lm_head weight, without the full [N, V] fp32 logits.

Phi-3's vocabulary (32064) makes the logits the largest activation of a LoRA step: 4 x 512 tokens of fp32 logits
are 263 MB, and autograd would keep them (and their softmax) for the backward. Here the logits exist one chunk of
rows at a time: each chunk's loss and its gradients w.r.t. the hidden states (and the weight, if it trains) are
computed in the forward, and the backward only scales them by the incoming gradient. Only rows with a target are
projected at all: in chat data most positions are prompt and cost nothing.

reduction='sum' returns the summed loss; the caller divides by the token count of the whole accumulated batch,
which makes gradient accumulation (and data parallelism) equal to one large batch.

Backends: the chunk loop and its autograd Function live in phi3fast.kernels.cross_entropy, next to the Triton
row kernel; this module holds the argument checks and `ce_rows_torch`, the PyTorch row math that is the CPU path
(backend='torch', and 'auto' off CUDA) and the kernel's oracle.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

# 1024 rows x 32064 vocab x 4 bytes = 131 MB of fp32 logits at a time; large enough for full-speed matmuls.
DEFAULT_CHUNK = 1024


def ce_rows_torch(logits: torch.Tensor, labels: torch.Tensor, write_grad: bool) -> torch.Tensor:
    """fp32 loss of each row of logits [n, V] against labels [n] (all in [0, V)); with write_grad, logits is
    overwritten with d(loss)/d(logits) = softmax - onehot(labels)."""
    x = logits.float()  # fp32 logits are used (and overwritten) in place; 16-bit ones get one fp32 copy
    target = x.gather(1, labels[:, None]).squeeze(1)
    # log-sum-exp by hand, in place: the exponentials it needs are the softmax the gradient needs.
    peak = x.amax(dim=-1, keepdim=True)
    expd = x.sub_(peak).exp_()
    denom = expd.sum(dim=-1, keepdim=True)
    loss = peak.squeeze(1) + denom.squeeze(1).log() - target
    if write_grad:
        p = expd.div_(denom)
        p[torch.arange(p.shape[0], device=p.device), labels] -= 1.0
        if p.data_ptr() != logits.data_ptr():
            logits.copy_(p)
    return loss


def check_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_size: int | None,
    reduction: str,
) -> tuple[torch.Tensor, int]:
    """Validate the arguments of a chunked cross-entropy; returns labels as int64 with every ignored position
    set to IGNORE_INDEX, and the chunk size (None -> DEFAULT_CHUNK)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    chunk = DEFAULT_CHUNK if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    labels = labels.long()
    ignored = labels == ignore_index
    if ignore_index != IGNORE_INDEX:
        labels = labels.masked_fill(ignored, IGNORE_INDEX)
    v = weight.shape[0]
    # The row kernel indexes the logits with the label, so an out-of-range one must never reach it.
    bad = ~ignored & ((labels < 0) | (labels >= v))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{i}] = {int(labels[i])} is outside the vocabulary [0, {v}) and not the "
                         f"ignore_index {ignore_index}")  # fmt: skip
    return labels, chunk


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = DEFAULT_CHUNK,
    reduction: str = "sum",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of softmax(hidden @ weight.T) against labels, chunked over rows. fp32 result.

    hidden [N, H], weight [V, H], labels [N] (ignore_index = no loss). reduction: 'sum' or 'mean' (over the
    rows with a target; 0 when there are none). backend: 'torch' = the PyTorch row math (CPU path and oracle),
    'triton' = the fused Triton row kernel (phi3fast.kernels.fused_linear_cross_entropy), 'auto' = Triton on
    CUDA, torch elsewhere.
    """
    from phi3fast.kernels.cross_entropy import fused_linear_cross_entropy

    return fused_linear_cross_entropy(hidden, weight, labels, ignore_index, chunk_size, reduction, backend)
