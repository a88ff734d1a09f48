"""Chunked cross-entropy over hidden states and the lm_head weight, without the full [N, V] fp32 logits.

Phi-3's vocabulary (32064) makes the logits the largest activation of a LoRA step: 4 x 512 tokens of fp32 logits
are 263 MB, and autograd would keep them (and their softmax) for the backward. Here the logits exist one chunk of
rows at a time: each chunk's loss and its gradients w.r.t. the hidden states (and the weight, if it trains) are
computed in the forward, and the backward only scales them by the incoming gradient. Only rows with a target are
projected at all: in chat data most positions are prompt and cost nothing.

reduction='sum' returns the summed loss; the caller divides by the token count of the whole accumulated batch,
which makes gradient accumulation (and data parallelism) equal to one large batch.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

# 1024 rows x 32064 vocab x 4 bytes = 131 MB of fp32 logits at a time; large enough for full-speed matmuls.
DEFAULT_CHUNK = 1024


def _chunked_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int,
    grad_h: bool,
    grad_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed loss over rows with a target; optionally d(loss)/d(hidden) and d(loss)/d(weight)."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    g_hidden = torch.zeros_like(hidden) if grad_h else None
    g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_w else None
    idx = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    for s in range(0, idx.numel(), chunk_size):
        rows = idx[s : s + chunk_size]
        h = hidden.index_select(0, rows)
        y = labels.index_select(0, rows)
        logits = (h @ weight.T).float()  # [n, V]: the only fp32 logits alive at any time
        target = logits.gather(1, y[:, None]).squeeze(1)
        # log-sum-exp by hand, in place: the exponentials it needs are the softmax the gradient needs.
        peak = logits.amax(dim=-1, keepdim=True)
        expd = logits.sub_(peak).exp_()
        denom = expd.sum(dim=-1, keepdim=True)
        total += (peak.squeeze(1) + denom.squeeze(1).log() - target).sum()
        if grad_h or grad_w:
            # d(lse - logit_y)/d(logits) = softmax - onehot(y), still in the chunk's buffer.
            p = expd.div_(denom)
            p[torch.arange(p.shape[0], device=p.device), y] -= 1.0
            if grad_h:
                g_hidden.index_copy_(0, rows, (p.to(weight.dtype) @ weight).to(hidden.dtype))
            if grad_w:
                g_weight += p.T @ h.float()
    return total, g_hidden, g_weight


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):  # type: ignore[override]
        loss, g_hidden, g_weight = _chunked_ce(
            hidden, weight, labels, chunk_size, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(
            g_hidden if g_hidden is not None else torch.empty(0),
            g_weight if g_weight is not None else torch.empty(0),
        )
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        g_hidden, g_weight = ctx.saved_tensors
        dh = g_hidden * grad_out.to(g_hidden.dtype) if ctx.needs_input_grad[0] else None
        dw = (g_weight * grad_out).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = DEFAULT_CHUNK,
    reduction: str = "sum",
) -> torch.Tensor:
    """Cross-entropy of softmax(hidden @ weight.T) against labels, chunked over rows. fp32 result.

    hidden [N, H], weight [V, H], labels [N] (ignore_index = no loss). reduction: 'sum' or 'mean' (over the
    rows with a target; 0 when there are none).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    labels = labels.long()
    if ignore_index != IGNORE_INDEX:
        labels = labels.masked_fill(labels == ignore_index, IGNORE_INDEX)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss = _ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_size)
    else:
        loss = _chunked_ce(hidden, weight, labels, chunk_size, False, False)[0]
    if reduction == "mean":
        loss = loss / max(int((labels != IGNORE_INDEX).sum()), 1)
    return loss
