"""Optional cheaper storage of the vocabulary projection for CPU decoding: `store_lm_head(model, torch.bfloat16)`.

The lm_head is the largest weight a decode step reads (SmolLM2-135M: 49152 x 576 fp32, 113 MB per token, about
twice all its NF4 layers together). Stored in bf16 it is half that; the native kernels widen each bf16 weight
to fp32 exactly (a 16-bit shift) and accumulate in fp32, and the torch path of StoredLMHead computes
F.linear(x, W.float()), the same products, so the two paths stay equal within fp32 rounding of each other.
What changes is the model: the weights are rounded to bf16 once (round to nearest even), so logits differ from
the fp32 model's by that rounding, and greedy output can differ. It is an explicit opt-in, never the default.
With tied embeddings the embedding keeps its fp32 table (the head gets its own bf16 copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phi3fast.errors import Phi3FastError

HEAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class StoredLMHead(nn.Module):
    """A bias-free lm_head whose weight is stored in a narrower dtype than the activations."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, stored={self.weight.dtype}"


def store_lm_head(model: nn.Module, dtype: torch.dtype | str) -> None:
    """Store `model.lm_head`'s weight in `dtype` ('bfloat16' or 'float32').

    'float32' on a stored head widens it back into a plain linear (the bf16 rounding stays)."""
    if isinstance(dtype, str):
        if dtype not in HEAD_DTYPES:
            raise Phi3FastError(f"lm_head dtype {dtype!r}: expected one of {', '.join(HEAD_DTYPES)}")
        dtype = HEAD_DTYPES[dtype]
    if dtype not in HEAD_DTYPES.values():
        raise Phi3FastError(f"lm_head dtype {dtype}: expected torch.float32 or torch.bfloat16")
    head = model.lm_head
    if not isinstance(head, (nn.Linear, StoredLMHead)) or getattr(head, "bias", None) is not None:
        raise Phi3FastError("store_lm_head needs a bias-free linear lm_head")
    w = head.weight.detach()
    if dtype == torch.float32 and not isinstance(head, StoredLMHead):
        return
    if w.dtype == dtype:
        return
    if dtype == model.dtype:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=dtype)
        lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        model.lm_head = lin
    else:
        model.lm_head = StoredLMHead(w.to(dtype))
