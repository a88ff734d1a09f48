"""Cross-entropy fused with the lm_head matmul: loss and gradients, chunked over rows, with a Triton row kernel.

fused_linear_cross_entropy(hidden [N, H], weight [V, H], labels [N]) = CE(softmax(hidden @ weight^T), labels),
without ever holding the [N, V] logits (Phi-3: V = 32064, so 8192 tokens of fp32 logits would be 1 GB, and
autograd would keep their softmax too). Per chunk of rows that HAVE a target (ignored rows are never projected):
1. logits = h @ W^T, a cuBLAS GEMM into a [rows, V] buffer of the activation dtype;
2. `_ce_rows_kernel`, one program per row: the row's log-sum-exp by an online max / sum of exponentials in fp32,
   its loss lse - logit[y], and, in place over the same buffer, d(loss)/d(logits) = softmax - onehot(y);
3. dH = grad @ W (and dW += grad^T h if the weight trains), GEMMs again.
So the loss and both gradients are finished in the forward; the backward only scales them by the incoming
gradient (the loss is a scalar), and nothing of size V outlives a chunk.

fp32 inside (note): the row kernel reads 16-bit logits but accumulates max, sum and log in fp32, so the loss is
the fp32 loss of the (rounded) logits, not a 16-bit reduction over 32064 terms, which is where fp16/bf16 losses
drift from fp32 ones. The loss is returned in fp32; dH is in the activation dtype, dW accumulates over the chunks
in fp32 and is cast to the weight's dtype once.

One row read, one row write (note): when the padded row fits in one block (V <= 32768: Phi-3's 32064 does), a
program holds its whole row in registers: read once, gradient written once. Larger vocabularies loop over
blocks twice (the online pass, then the gradient pass, whose re-read mostly hits L2).

The chunk driver and the autograd Function take the row math as a parameter: `ce_rows_torch` is the reference
(backend='torch', the CPU runtime path) and `ce_rows_triton` the kernel, so both backends share everything but
the row math.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._aot import AotSpec
from .backend import KernelInputError, resolve_backend

IGNORE_INDEX = -100
# 1024 rows x 32064 vocab x 4 bytes = 131 MB of fp32 logits at a time; large enough for full-speed matmuls.
DEFAULT_CHUNK = 1024

# 32768: Phi-3's padded vocabulary (32064 -> 32768) in one block; with 32 warps that is 32 values per thread,
# which the AOT report shows fit in registers without spills.
ONE_BLOCK_MAX = 32768
# Smallest one-row block: below it a row is padded up, so a handful of compiled sizes covers every vocabulary.
ONE_BLOCK_MIN = 2048
# Looped path (V > ONE_BLOCK_MAX): 4096 elements per step, 16 per thread with 8 warps.
LOOP_BLOCK = 4096

RowFn = Callable[[Tensor, Tensor, bool], Tensor]


# ---- kernels -----------------------------------------------------------------------------------------------------


@triton.jit
def _ce_rows_kernel(
    logits_ptr, labels_ptr, loss_ptr, V, stride_row,
    BLOCK_V: tl.constexpr, ONE_BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr,
):  # fmt: skip
    """Row r of logits [rows, V]: loss[r] = lse(x) - x[y] in fp32; with WRITE_GRAD, x := softmax(x) - onehot(y)
    in place. Every row has a target 0 <= y < V (the launcher only passes such rows)."""
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride_row
    y = tl.load(labels_ptr + row)
    # Read before the gradient overwrites the row.
    target = tl.load(ptr + y).to(tl.float32)
    cols = tl.arange(0, BLOCK_V)
    if ONE_BLOCK:
        mask = cols < V
        x = tl.load(ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        e = tl.exp(x - m)  # padding: exp(-inf) = 0
        d = tl.sum(e, 0)
        tl.store(loss_ptr + row, m + tl.log(d) - target)
        if WRITE_GRAD:
            # softmax for the whole row, then the target's entry once more minus 1: a `cols == y` select over
            # the block would keep 32 more registers live per thread and make the 32768 block spill.
            tl.store(ptr + cols, (e / d).to(logits_ptr.dtype.element_ty), mask=mask)
            tl.debug_barrier()  # the row store above (any thread) lands before the target's fix below
            tl.store(ptr + y, (tl.exp(target - m) / d - 1.0).to(logits_ptr.dtype.element_ty))
    else:
        # Online log-sum-exp: d is the sum of exp(x - m) for the running max m, rescaled when m grows.
        m = float("-inf")
        d = 0.0
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        tl.store(loss_ptr + row, m + tl.log(d) - target)
        if WRITE_GRAD:
            inv_d = 1.0 / d
            for start in range(0, V, BLOCK_V):
                mask = start + cols < V
                x = tl.load(ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - m) * inv_d - tl.where(start + cols == y, 1.0, 0.0)
                tl.store(ptr + start + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


# ---- torch reference and argument checks ----------------------------------------------------------------------


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
        raise KernelInputError(
            f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise KernelInputError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if labels.shape != hidden.shape[:1]:
        raise KernelInputError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise KernelInputError(f"labels must be integers, got {labels.dtype}")
    if reduction not in ("sum", "mean"):
        raise KernelInputError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    chunk = DEFAULT_CHUNK if chunk_size is None else chunk_size
    if chunk < 1:
        raise KernelInputError(f"chunk_size must be >= 1, got {chunk_size}")
    labels = labels.long()
    ignored = labels == ignore_index
    if ignore_index != IGNORE_INDEX:
        labels = labels.masked_fill(ignored, IGNORE_INDEX)
    v = weight.shape[0]
    # The row kernel indexes the logits with the label, so an out-of-range one must never reach it.
    bad = ~ignored & ((labels < 0) | (labels >= v))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise KernelInputError(f"labels[{i}] = {int(labels[i])} is outside the vocabulary [0, {v}) and not the "
                         f"ignore_index {ignore_index}")  # fmt: skip
    return labels, chunk


# ---- launchers ---------------------------------------------------------------------------------------------------


def row_config(v: int) -> tuple[int, bool, int]:
    """(BLOCK_V, ONE_BLOCK, num_warps) for a vocabulary of v: the whole row in one block when it fits, with
    about 32 fp32 values per thread; else the looped kernel."""
    block = max(triton.next_power_of_2(v), ONE_BLOCK_MIN)
    if block <= ONE_BLOCK_MAX:
        return block, True, min(32, max(4, block // 1024))
    return LOOP_BLOCK, False, 8


def ce_rows_triton(logits: Tensor, labels: Tensor, write_grad: bool) -> Tensor:
    """fp32 loss per row of logits [rows, V] (contiguous) against labels [rows] (all in [0, V)); with
    write_grad, logits becomes softmax - onehot in place."""
    rows, v = logits.shape
    assert logits.stride(1) == 1 and labels.shape == (rows,)
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out
    block, one_block, warps = row_config(v)
    _ce_rows_kernel[(rows,)](
        logits, labels, out, v, logits.stride(0),
        BLOCK_V=block, ONE_BLOCK=one_block, WRITE_GRAD=write_grad, num_warps=warps, num_stages=1,
    )  # fmt: skip
    return out


def chunked_forward(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    chunk_size: int,
    grad_h: bool,
    grad_w: bool,
    rows_fn: RowFn,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Summed fp32 loss over rows with a target (labels != IGNORE_INDEX); optionally d(loss)/d(hidden) [N, H]
    in hidden's dtype and d(loss)/d(weight) [V, H] in fp32. Only one chunk's logits exist at a time."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    g_hidden = torch.zeros_like(hidden) if grad_h else None
    g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_w else None
    idx = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    for s in range(0, idx.numel(), chunk_size):
        rows = idx[s : s + chunk_size]
        h = hidden.index_select(0, rows)
        y = labels.index_select(0, rows)
        logits = h @ weight.T  # [rows, V] in the activation dtype: the only logits alive
        total += rows_fn(logits, y, grad_h or grad_w).sum()
        # `logits` now holds softmax - onehot(y).
        if grad_h:
            g_hidden.index_copy_(0, rows, logits @ weight)
        if grad_w:
            # fp32 accumulation across chunks (a 16-bit running sum would round every chunk's contribution).
            g_weight.addmm_(logits.T.float(), h.float())
    return total, g_hidden, g_weight


# ---- autograd ----------------------------------------------------------------------------------------------------


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Inputs hidden [N, H], weight [V, H] (differentiable), labels [N] (IGNORE_INDEX = no target), chunk size
    and row function. The gradients are computed in the forward; saved are only dH (N x H, what autograd would
    keep as the input anyway) and, when the weight trains, dW."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, rows_fn):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, g_hidden, g_weight = chunked_forward(
            hidden, weight, labels, chunk_size, need_h, need_w, rows_fn
        )
        empty = hidden.new_empty(0)
        ctx.save_for_backward(g_hidden if need_h else empty, g_weight if need_w else empty)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        g_hidden, g_weight = ctx.saved_tensors
        dh = g_hidden * grad_out.to(g_hidden.dtype) if ctx.needs_input_grad[0] else None
        dw = (g_weight * grad_out).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    reduction: str = "sum",
    backend: str = "auto",
) -> Tensor:
    """fp32 cross-entropy of softmax(hidden @ weight^T) against labels, chunked over the rows with a target.

    hidden [N, H], weight [V, H] (same dtype), labels [N] integer (ignore_index: no loss, no cost). reduction
    'sum' (the training loop divides by the token count of the whole accumulated batch) or 'mean' (over the
    rows with a target; 0 when there are none). chunk_size: rows per chunk (None: DEFAULT_CHUNK).
    backend: 'auto' = Triton on CUDA, torch on CPU; 'triton' on CPU runs the interpreter (fp32/fp16)."""
    labels, chunk = check_args(hidden, weight, labels, ignore_index, chunk_size, reduction)
    resolved = resolve_backend(backend, hidden.device, hidden.dtype, gemm=False)
    rows_fn = ce_rows_torch if resolved == "torch" else ce_rows_triton
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss = FusedLinearCrossEntropyFunction.apply(hidden, weight, labels, chunk, rows_fn)
    else:
        loss = chunked_forward(hidden, weight, labels, chunk, False, False, rows_fn)[0]
    if reduction == "mean":
        loss = loss / max(int((labels != IGNORE_INDEX).sum()), 1)
    return loss


# ---- AOT specs ---------------------------------------------------------------------------------------------------


def aot_specs() -> list[AotSpec]:
    """The row kernel for every logits dtype, with and without the gradient, at every block `row_config` can
    pick: one-block rows from ONE_BLOCK_MIN to ONE_BLOCK_MAX and the looped kernel."""
    specs = []
    kernel = _ce_rows_kernel
    blocks = []
    b = ONE_BLOCK_MIN
    while b <= ONE_BLOCK_MAX:
        blocks.append(row_config(b))
        b *= 2
    blocks.append(row_config(ONE_BLOCK_MAX + 1))
    for dname in ("bf16", "fp16", "fp32"):
        sig = {
            "logits_ptr": f"*{dname}",
            "labels_ptr": "*i64",
            "loss_ptr": "*fp32",
            "V": "i32",
            "stride_row": "i32",
        }
        for block, one, warps in blocks:
            for grad in (True, False):
                label = f"{dname},BLOCK_V={block},ONE_BLOCK={int(one)},grad={int(grad)},w={warps}"
                consts = {"BLOCK_V": block, "ONE_BLOCK": one, "WRITE_GRAD": grad}
                specs.append(AotSpec(kernel, "cross_entropy_rows", label, sig, consts, warps, 1))
    return specs
