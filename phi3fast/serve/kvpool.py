"""The server's KV cache: one slot (row) per running sequence in a shared pool [layers, slots, kv_heads, cap, hd].

Slots stay contiguous: the running sequences occupy rows 0..n-1, so a decode step attends over the view
`pool[:, :n, :, :S]` without copying; when a sequence leaves, the last one moves into its row (one copy of one
sequence). The position capacity `cap` grows by doubling up to the context limit, so memory follows the longest
running sequence, not the limit.

The two views below give Attention the `update(layer, k, v)` / `length` interface of phi3fast.model.KVCache:
a prefill writes one sequence's prompt into its row; a decode step writes one token per row, each at that row's
own position, and returns the padded batch of caches (the attention mask hides each row's padding).
"""

from __future__ import annotations

import torch
from torch import Tensor


class SlotPool:
    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        initial: int = 256,
    ) -> None:
        self.max_len = max_len
        self._shape = (layers, slots, kv_heads, head_dim)
        self._dtype, self._device = dtype, device
        self.cap = 0
        self.k = self.v = torch.empty(0)
        self.reserve(min(initial, max_len))

    def reserve(self, length: int) -> None:
        """Make room for `length` positions in every slot (keeping what is cached)."""
        if length <= self.cap:
            return
        if length > self.max_len:
            raise ValueError(f"KV pool: {length} positions > the context limit {self.max_len}")
        cap = min(self.max_len, max(length, 2 * self.cap))
        layers, slots, kv, hd = self._shape
        k = torch.zeros((layers, slots, kv, cap, hd), dtype=self._dtype, device=self._device)
        v = torch.zeros_like(k)
        if self.cap:
            k[:, :, :, : self.cap] = self.k
            v[:, :, :, : self.cap] = self.v
        self.k, self.v, self.cap = k, v, cap

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of slot src into slot dst."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def prefill_view(self, first: int, count: int = 1) -> PrefillView:
        return PrefillView(self, first, count)

    def decode_view(self, positions: Tensor) -> DecodeView:
        return DecodeView(self, positions)


class PrefillView:
    """Whole prompts of `count` new sequences (right-padded to one length), written into slots
    first..first+count-1 from position 0."""

    def __init__(self, pool: SlotPool, first: int, count: int) -> None:
        self.pool, self.first, self.last = pool, first, first + count
        self.length = 0  # the model's forward reads it as the number of cached positions before this call

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        t, a, b = k.shape[2], self.first, self.last
        self.pool.k[layer, a:b, :, :t] = k
        self.pool.v[layer, a:b, :, :t] = v
        return self.pool.k[layer, a:b, :, :t], self.pool.v[layer, a:b, :, :t]


class DecodeView:
    """One new token for each of the slots 0..B-1, row b at positions[b]; returns keys/values [B, kv, S, hd]
    with S = max(positions) + 1 (rows shorter than S are padding past their own position)."""

    def __init__(self, pool: SlotPool, positions: Tensor) -> None:
        self.pool = pool
        b = positions.shape[0]
        _, _, kv, cap, _ = pool.k.shape
        # Row (slot b, head h, position p) of one layer's cache seen as [slots * kv * cap, hd]: a plain
        # index_copy_ then writes every new key, where indexing by (slot, position) pairs is many times slower.
        heads = torch.arange(kv, device=positions.device)
        slots = torch.arange(b, device=positions.device)
        self.dest = ((slots[:, None] * kv + heads[None, :]) * cap + positions[:, None]).reshape(-1)
        self.span = int(positions.max()) + 1
        self.length = 0  # unused by the caller (the decode step builds its own mask)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        b, kv, _, hd = k.shape
        pk, pv = self.pool.k[layer], self.pool.v[layer]
        pk.view(-1, hd).index_copy_(0, self.dest, k.reshape(b * kv, hd))
        pv.view(-1, hd).index_copy_(0, self.dest, v.reshape(b * kv, hd))
        return pk[:b, :, : self.span], pv[:b, :, : self.span]
