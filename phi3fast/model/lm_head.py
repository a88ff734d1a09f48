"""Optional cheaper storage of the vocabulary projection for CPU decoding: `store_lm_head(model, "bfloat16")` or
`store_lm_head(model, "int8")`.

The lm_head is the largest weight a decode step reads (SmolLM2-135M: 49152 x 576 fp32, 113 MB per token, about
twice all its NF4 layers together), and reading it is what that projection's time is. Stored in bf16 it is half
that; as int8 rows with one fp32 scale per row (absmax / 127, round to nearest) a quarter plus the scales. The
native kernels widen each stored weight to fp32 exactly and accumulate in fp32 (int8: the row's sum times its
scale); the torch path of StoredLMHead multiplies by the same weights widened (int8: q * scale), so the two paths
agree within fp32 rounding. What changes is the model: its head weights are rounded once, so logits differ from
the fp32 model's by that rounding and greedy output can differ. An explicit opt-in, never the default. With tied
embeddings the embedding keeps its fp32 table (the head gets its own copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phi3fast.errors import Phi3FastError

HEAD_STORES = ("float32", "bfloat16", "int8")


class StoredLMHead(nn.Module):
    """A bias-free lm_head stored narrower than the activations: bf16 weights, or int8 rows with fp32 scales."""

    def __init__(self, weight: Tensor, scale: Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.scale = (
            None if scale is None else nn.Parameter(scale.detach().float().contiguous(), requires_grad=False)
        )
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @property
    def store(self) -> str:
        return "int8" if self.weight.dtype == torch.int8 else "bfloat16"

    def widened(self, dtype: torch.dtype) -> Tensor:
        """The stored weights as `dtype` (int8: q * scale)."""
        w = self.weight.to(dtype)
        return w if self.scale is None else w * self.scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.widened(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, stored={self.store}"


def quantize_rows_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 [N, K], scale fp32 [N]) with w ~= q * scale[:, None], scale = max |row| / 127."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def store_lm_head(model: nn.Module, store: str) -> None:
    """Store `model.lm_head` as 'float32' (the model's own head: nothing changes), 'bfloat16' or 'int8'.

    Only from the fp32 head: a stored head is not converted again (reload the model to change it)."""
    if store not in HEAD_STORES:
        raise Phi3FastError(f"lm_head storage {store!r}: expected one of {', '.join(HEAD_STORES)}")
    head = model.lm_head
    if isinstance(head, StoredLMHead):
        if head.store == store:
            return
        raise Phi3FastError(
            f"the lm_head is already stored as {head.store}; reload the model to store it as {store}"
        )
    if not isinstance(head, nn.Linear) or head.bias is not None or head.weight.dtype != torch.float32:
        raise Phi3FastError("store_lm_head needs the model's bias-free fp32 linear lm_head")
    if store == "float32":
        return
    w = head.weight.detach()
    model.lm_head = (
        StoredLMHead(w.to(torch.bfloat16)) if store == "bfloat16" else StoredLMHead(*quantize_rows_int8(w))
    )
