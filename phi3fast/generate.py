"""Chat generation with a KV cache: greedy (temperature 0, deterministic) or sampled (temperature, top-p, seed).

Decode steps run the model on one token against the cache; each projection then is a matrix-vector product,
which on CUDA goes to nf4_matmul's small-M (split-K) kernel. On CPU, when phi3fast.model.native_decode supports
the model (fp32 activations, full rotary, kernel backend 'auto'), each step after the prompt is one native call
through every layer (docs/cpu-inference.md); otherwise the torch modules run it. Generation stops at <|end|>, at any eos id of the
checkpoint (tokenizer eos and generation_config.json's eos_token_id list), or after max_new_tokens.

LongRoPE note: a 128k variant switches every position to the long factors once the sequence exceeds
original_max_position_embeddings; keys cached with the short factors would then be wrong, so the sequence is
re-encoded once at that point (transformers does the same).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from phi3fast.errors import Phi3FastError
from phi3fast.kernels import nf4_cpu
from phi3fast.kernels.backend import one_cpu_thread
from phi3fast.model import native_decode
from phi3fast.model.chat import chat_prompt_ids, stop_ids
from phi3fast.model.lm_head import StoredLMHead
from phi3fast.model.phi3 import KVCache, Phi3ForCausalLM


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Next token from fp32 logits [V]: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_tokens(
    model: Phi3ForCausalLM,
    prompt_ids: list[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Iterable[int] = (),
) -> Iterator[int]:
    """Yield new token ids one at a time (the stop token itself is not yielded)."""
    if temperature < 0 or not 0.0 < top_p <= 1.0 or max_new_tokens < 0:
        raise Phi3FastError(f"need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 0 (got {temperature}, {top_p}, {max_new_tokens})")  # fmt: skip
    cfg = model.config
    if not prompt_ids:
        raise Phi3FastError("empty prompt")
    total = min(len(prompt_ids) + max_new_tokens, cfg.max_position_embeddings)
    if len(prompt_ids) >= cfg.max_position_embeddings:
        raise Phi3FastError(
            f"prompt of {len(prompt_ids)} tokens exceeds the context ({cfg.max_position_embeddings})"
        )
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    stop = set(stop)
    # Ids past the tokenizer's vocabulary are embedding padding (Phi-3 pads 32011 tokens to 32064): never emit them.
    n_real = len(model.tokenizer)
    device = model.device
    ids = list(prompt_ids)
    was_training = model.training
    model.eval()  # no LoRA dropout while generating, even mid-training
    try:
        yield from _decode(model, ids, total, temperature, top_p, generator, stop, n_real, device)
    finally:
        model.train(was_training)


def _decode(
    model: Phi3ForCausalLM,
    ids: list[int],
    total: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    stop: set[int],
    n_real: int,
    device: torch.device,
) -> Iterator[int]:
    cfg = model.config
    cache = model.new_kv_cache(1, total)
    logits = _next_logits(model, torch.tensor([ids], device=device), cache)
    step = torch.empty((1, 1), dtype=torch.long, device=device)  # the one input tensor of every decode step
    native = _NativeSteps(model, total) if native_decode.unsupported(model) is None else None
    long_rope = cfg.rope_scaling is not None and len(ids) > cfg.original_max_position_embeddings
    while len(ids) < total:
        scores = logits.float().cpu()
        scores[n_real:] = float("-inf")
        token = sample(scores, temperature, top_p, generator)
        if token in stop:
            return
        yield token
        ids.append(token)
        if len(ids) >= total:
            return
        if cfg.rope_scaling is not None and not long_rope and len(ids) > cfg.original_max_position_embeddings:
            long_rope = True  # re-encode everything with the long factors (see the module note)
            cache = model.new_kv_cache(1, total)
            logits = _next_logits(model, torch.tensor([ids], device=device), cache)
        elif native is not None:
            logits = native.next_logits(token, cache)
        else:
            step.fill_(token)
            logits = _next_logits(model, step, cache)


class _NativeSteps:
    """Batch-1 decode steps through the native step (phi3fast.model.native_decode): one call per token, into
    the same KV cache the prompt's prefill filled; the inputs and the logits are preallocated."""

    def __init__(self, model: Phi3ForCausalLM, total: int) -> None:
        self.decoder = native_decode.NativeDecoder(model, total)
        self.tokens = torch.zeros(1, dtype=torch.int64)
        self.positions = torch.zeros(1, dtype=torch.int64)
        self.adapters = torch.full((1,), self.decoder.own_adapter, dtype=torch.int32)
        self.logits = torch.empty((1, model.config.vocab_size), dtype=torch.float32)
        self._tok, self._pos = self.tokens.numpy(), self.positions.numpy()
        self._checked: KVCache | None = (
            None  # the cache the operands were checked with (LongRoPE makes a new one)
        )

    def next_logits(self, token: int, cache: KVCache) -> Tensor:
        self._tok[0], self._pos[0] = token, cache.length
        operands = (self.tokens, self.positions, self.adapters, cache.k, cache.v, self.logits)
        if cache is not self._checked:
            self.decoder.check(*operands)
            self._checked = cache
        self.decoder.run(*operands)
        cache.length += 1
        return self.logits[0]


@contextmanager
def _cpu_step_threads(device: torch.device) -> Iterator[None]:
    """On CPU with the native kernels: torch's own ops on one thread, the native kernels on every thread torch
    had. A decode step is ~300 tiny torch ops; as OpenMP regions each waits for every worker, and on a busy
    machine for a descheduled one, while the native pool never waits for a worker that has not started
    (docs/cpu-inference.md has the profile). Entered per model call, never across a yield."""
    if device.type != "cpu" or not nf4_cpu.available():
        yield
        return
    with nf4_cpu.pinned_threads(torch.get_num_threads()), one_cpu_thread(device):
        yield


def _next_logits(model: Phi3ForCausalLM, input_ids: Tensor, cache: KVCache) -> Tensor:
    """Logits [V] of the last position only: lm_head runs on one row, not on every prompt position."""
    with _cpu_step_threads(input_ids.device):
        h = model.hidden_states(input_ids, kv_cache=cache)[0, -1:]
        head = model.lm_head
        stored = isinstance(head, StoredLMHead) and h.dtype == torch.float32 and h.device.type == "cpu"
        if stored and nf4_cpu.available() and hasattr(nf4_cpu._native, "head_linear"):
            return native_decode.head_logits(head, h)[0]
        if isinstance(head, torch.nn.Linear) and head.bias is None and nf4_cpu.supports(h):
            if head.weight.device.type == "cpu" and head.weight.dtype == h.dtype:
                return nf4_cpu.dense_linear(h, head.weight)[0]
        return model.lm_head(h)[0]


def detokenize(tokenizer: Any, tokens: Iterable[int]) -> Iterator[str]:
    """Text pieces as tokens arrive; a piece is held back while it ends inside a multi-byte character."""
    ids: list[int] = []
    sent = ""
    for t in tokens:
        ids.append(t)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(sent):
            yield text[len(sent) :]
        sent = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > len(sent):
        yield text[len(sent) :]


def stream_chat(
    model: Phi3ForCausalLM,
    messages: list[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> Iterator[str]:
    """Decoded text pieces of the assistant's reply (KV cache; greedy when temperature == 0; stops at <|end|>)."""
    tokens = generate_tokens(
        model,
        chat_prompt_ids(model, messages),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop_ids(model),
    )
    yield from detokenize(model.tokenizer, tokens)


def generate_text(model: Phi3ForCausalLM, messages: list[dict], **kwargs: Any) -> str:
    """The whole reply of stream_chat as one string."""
    return "".join(stream_chat(model, messages, **kwargs))
