"""Chunked cross-entropy over hidden states and the lm_head weight, without the full [N, V] fp32 logits.

Phi-3's vocabulary (32064) makes the logits the largest activation of a LoRA step: 4 x 512 tokens of fp32 logits
are 263 MB, and autograd would keep them (and their softmax) for the backward. Here the logits exist one chunk of
rows at a time: each chunk's loss and its gradients w.r.t. the hidden states (and the weight, if it trains) are
computed in the forward, and the backward only scales them by the incoming gradient. Only rows with a target are
projected at all: in chat data most positions are prompt and cost nothing.

reduction='sum' returns the summed loss; the caller divides by the token count of the whole accumulated batch,
which makes gradient accumulation (and data parallelism) equal to one large batch.

The chunk loop, its autograd Function, the argument checks and both row backends (the PyTorch reference and the
Triton kernel) live in phi3fast.kernels.cross_entropy; this is the training loop's entry point.
"""

from __future__ import annotations

import torch

from phi3fast.kernels.cross_entropy import DEFAULT_CHUNK, IGNORE_INDEX, fused_linear_cross_entropy

__all__ = ["DEFAULT_CHUNK", "IGNORE_INDEX", "chunked_cross_entropy"]


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
    'triton' = the fused Triton row kernel, 'auto' = Triton on CUDA, torch elsewhere.
    """
    return fused_linear_cross_entropy(hidden, weight, labels, ignore_index, chunk_size, reduction, backend)
