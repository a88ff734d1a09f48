"""Continuous batching: one thread runs the model; requests join and leave the running batch between steps.

Each loop iteration admits waiting requests while slots are free (a prefill of each new prompt into its own
KV slot, with its adapter), then runs one decode step for every running sequence together: one token per row,
each at its own position, with an attention mask over the padded batch of per-sequence caches and each row's
LoRA adapter applied by the adapter bank; on CPU, when phi3fast.model.native_decode supports the model, the
whole step is one native call with each row's adapter (the torch path otherwise). Sequences that finished, or whose client went away, leave before the
next step and free their slot.

Tokens reach the request's handler through a callback (the HTTP layer forwards them to its event loop).
Sampling is phi3fast.generate's: argmax at temperature 0 (deterministic), else nucleus sampling with the
request's own seeded generator, so a request decodes as `phi3fast generate` would decode it alone.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from phi3fast.generate import sample
from phi3fast.model import Phi3ForCausalLM, native_decode
from phi3fast.model.chat import stop_ids
from phi3fast.serve.adapters import Adapter, AdapterBank
from phi3fast.serve.kvpool import SlotPool

# Events sent to a request's callback: ("token", id), ("end", "stop" | "length"), ("error", message).
Event = tuple[str, object]


PREFILL_TOKENS = 4096  # padded prompt tokens per prefill forward pass: bounds its activation memory
NATIVE_ADAPTERS = 64  # adapters registered with the native step before it is rebuilt (drops removed ones)


class QueueFull(Exception):
    """More requests than running slots plus the queue limit."""


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    adapter: Adapter | None
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Seq:
    job: Job
    generator: torch.Generator | None
    length: int  # positions cached
    produced: int = 0
    last: int = 0  # the token to feed at the next decode step


class Engine:
    def __init__(
        self, model: Phi3ForCausalLM, bank: AdapterBank, max_batch: int, max_queue: int, max_context: int
    ) -> None:
        cfg = model.config
        self.model, self.bank = model, bank
        self.max_batch, self.max_queue, self.max_context = max_batch, max_queue, max_context
        self.stop_ids = stop_ids(model)
        self.n_real = len(model.tokenizer)  # ids past the tokenizer are embedding padding: never sampled
        self.pool = SlotPool(
            cfg.num_hidden_layers, max_batch, cfg.num_key_value_heads, cfg.head_dim, max_context,
            model.dtype, model.device,
        )  # fmt: skip
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: list[_Seq] = []  # row i of the batch lives in KV slot i
        self._admitting = 0  # taken off the queue, prefill not done yet: still counted as load
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run
        self.mixed_steps = 0  # decode steps whose batch held rows of two or more different adapters
        self.native_steps = 0  # of which through the native step (phi3fast.model.native_decode)
        self._native: _NativeBatch | None = None
        if native_decode.unsupported(model) is None:
            self._native = _NativeBatch(model, max_batch, max_context)

    # ---- any thread ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="phi3fast-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish nothing more: called once the HTTP server has drained its requests."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) + len(self._running) + self._admitting >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self.max_batch} running and {self.max_queue} queued requests")
            self._waiting.append(job)
            self._cond.notify()

    def load(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._cond:
            return len(self._running) + self._admitting, len(self._waiting)

    # ---- the engine thread -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        self.model.eval()
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._waiting or self._running or self._stopping):
                        self._cond.wait()
                    if self._stopping and not self._running:
                        for job in self._waiting:
                            job.emit(("error", "the server is shutting down"))
                        self._waiting.clear()
                        return
                    admit = []
                    while self._waiting and len(self._running) + len(admit) < self.max_batch:
                        admit.append(self._waiting.popleft())
                    self._admitting = len(admit)
                try:
                    self._prefill_all(admit)
                    self._drop_done()
                    if self._running:
                        self._decode_step()
                        self._drop_done()
                except Exception as e:  # a failing step must not take the server down: fail its requests
                    jobs = [s.job for s in self._running]
                    jobs += [j for j in admit if all(j is not k for k in jobs)]
                    for job in jobs:
                        job.emit(("error", f"{type(e).__name__}: {e}"))
                        job.cancel()
                    with self._cond:
                        self._running = []
                        self._admitting = 0
                    self.bank.clear_rows()

    def _prefill_all(self, jobs: list[Job]) -> None:
        """Prefill the admitted prompts together, in groups of at most PREFILL_TOKENS padded tokens."""
        live = [j for j in jobs if not j.cancelled.is_set()]
        with self._cond:
            self._admitting -= len(jobs) - len(live)
        group: list[Job] = []
        for job in live:
            longest = max([len(job.prompt), *(len(j.prompt) for j in group)])
            if group and (len(group) + 1) * longest > PREFILL_TOKENS:
                self._prefill(group)
                group = []
            group.append(job)
        if group:
            self._prefill(group)

    def _prefill(self, jobs: list[Job]) -> None:
        """One forward pass over the prompts (right-padded to the longest), each into its own new KV slot."""
        model = self.model
        lengths = [len(j.prompt) for j in jobs]
        b, t = len(jobs), max(lengths)
        self.pool.reserve(t)
        self.bank.set_rows([j.adapter for j in jobs])
        view = self.pool.prefill_view(len(self._running), b)
        if b == 1:  # exactly the forward pass phi3fast.generate runs for a prompt
            h = model.hidden_states(torch.tensor([jobs[0].prompt], device=model.device), kv_cache=view)[:, -1]
        else:
            ids = torch.zeros((b, t), dtype=torch.long, device=model.device)
            for i, j in enumerate(jobs):
                ids[i, : lengths[i]] = torch.tensor(j.prompt)
            lens = torch.tensor(lengths, device=model.device)
            pos = torch.arange(t, device=model.device)
            h = model.embed_tokens(ids)
            cos, sin = model.rotary(pos.expand(b, t), h.dtype)
            # Causal, and no key past a row's own prompt: the padding never reaches a real position (a padded
            # query row still sees position 0, so no row of the mask is empty).
            mask = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] < lens[:, None, None])
            window = model.config.sliding_window
            if window is not None:
                mask = mask & (pos[None, :] > pos[:, None] - window)[None]
            for layer in model.layers:
                h = layer(h, cos, sin, mask[:, None], False, view)
            h = model.norm(h[torch.arange(b, device=model.device), lens - 1])
        logits = model.lm_head(h)  # the last prompt position of each row only
        seqs = []
        for job, n in zip(jobs, lengths, strict=True):
            gen = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
            seqs.append(_Seq(job, gen, length=n))
        with self._cond:
            self._running.extend(seqs)
            self._admitting -= b
        for i, seq in enumerate(seqs):
            self._advance(seq, logits[i : i + 1])

    def _decode_step(self) -> None:
        model, run = self.model, self._running
        positions = torch.tensor([s.length for s in run], device=model.device)
        self.pool.reserve(int(positions.max()) + 1)
        rows = [s.job.adapter for s in run]
        if len({id(a) for a in rows if a is not None}) >= 2:
            self.mixed_steps += 1
        native = self._native.rows(rows) if self._native is not None else None
        if native is not None:
            tokens = torch.tensor([s.last for s in run], dtype=torch.int64)
            logits = self._native.step(tokens, positions, native, self.pool)
            self.native_steps += 1
        else:
            self.bank.set_rows(rows)
            tokens = torch.tensor([[s.last] for s in run], device=model.device)
            h = model.embed_tokens(tokens)
            cos, sin = model.rotary(positions[:, None], h.dtype)
            mask = self._mask(positions)
            view = self.pool.decode_view(positions)
            for layer in model.layers:
                h = layer(h, cos, sin, mask, False, view)
            logits = model.lm_head(model.norm(h))[:, 0]
        for s in run:
            s.length += 1
        self.steps += 1
        self._advance_all(logits)

    def _mask(self, positions: Tensor) -> Tensor:
        """[B, 1, 1, S] True where row b may attend: its own cached positions 0..pos_b (and the window)."""
        kj = torch.arange(int(positions.max()) + 1, device=positions.device)[None, :]
        q = positions[:, None]
        mask = kj <= q
        window = self.model.config.sliding_window
        if window is not None:
            mask = mask & (kj > q - window)
        return mask[:, None, None, :]

    def _advance_all(self, logits: Tensor) -> None:
        scores = logits.float().cpu()
        scores[:, self.n_real :] = float("-inf")
        greedy = torch.argmax(scores, dim=-1).tolist()
        for i, s in enumerate(self._running):
            j = s.job
            tok = (
                greedy[i] if j.temperature == 0.0 else sample(scores[i], j.temperature, j.top_p, s.generator)
            )
            self._take(s, tok)

    def _advance(self, seq: _Seq, logits: Tensor) -> None:
        scores = logits.float().cpu()[0]
        scores[self.n_real :] = float("-inf")
        j = seq.job
        self._take(seq, sample(scores, j.temperature, j.top_p, seq.generator))

    def _take(self, s: _Seq, tok: int) -> None:
        j = s.job
        if j.cancelled.is_set():
            return
        if tok in self.stop_ids:
            j.emit(("end", "stop"))
            j.cancel()
            return
        j.emit(("token", tok))
        s.produced += 1
        s.last = tok
        if s.produced >= j.max_tokens or s.length + 1 >= self.max_context:
            j.emit(("end", "length"))
            j.cancel()

    def _drop_done(self) -> None:
        """Remove finished/cancelled sequences; the last running one moves into each freed slot."""
        run = self._running
        i = 0
        while i < len(run):
            if run[i].job.cancelled.is_set():
                last = len(run) - 1
                if i != last:
                    self.pool.move(last, i, run[last].length)
                with self._cond:
                    run[i] = run[last]
                    run.pop()
            else:
                i += 1


class _NativeBatch:
    """The batched decode step through phi3fast.model.native_decode: every row's token, at its own position,
    on its own adapter (registered with the native step the first time a row uses it). Rows on an adapter while
    the model carries LoRA factors of its own take the torch path (the two would have to stack)."""

    def __init__(self, model: Phi3ForCausalLM, max_batch: int, max_context: int) -> None:
        self.model, self.max_context = model, max_context
        self.logits = torch.empty((max_batch, model.config.vocab_size), dtype=torch.float32)
        self._build()

    def _build(self) -> None:
        self.decoder = native_decode.NativeDecoder(self.model, self.max_context)
        self._index: dict[int, tuple[Adapter, int]] = {}  # id(adapter) -> (adapter, index); keeps it alive

    def rows(self, adapters: list[Adapter | None]) -> Tensor | None:
        """Each row's adapter index (int32), or None when a row needs the torch path."""
        out = []
        for a in adapters:
            if a is None:
                out.append(self.decoder.own_adapter)
                continue
            if self.decoder.own_adapter == 0:
                return None
            entry = self._index.get(id(a))
            if entry is None:
                if len(self._index) >= NATIVE_ADAPTERS:
                    self._build()
                    return self.rows(adapters)
                weights = {name: (wa, wb, 1.0) for name, (wa, wb) in a.weights.items()}  # B carries the scale
                entry = self._index[id(a)] = (a, self.decoder.add_adapter(weights))
            out.append(entry[1])
        return torch.tensor(out, dtype=torch.int32)

    def step(self, tokens: Tensor, positions: Tensor, rows: Tensor, pool) -> Tensor:  # noqa: ANN001
        logits = self.logits[: tokens.shape[0]]
        return self.decoder.step(tokens, positions, rows, pool.k, pool.v, logits)
