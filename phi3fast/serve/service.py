"""What the server does, without HTTP: the loaded base model, its adapters, the indexes and the engine, and one
chat request turned into a stream of text pieces (with usage and RAG sources at the end)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from phi3fast.errors import ArgumentError, Phi3FastError
from phi3fast.model import Phi3ForCausalLM
from phi3fast.model.chat import chat_prompt_ids
from phi3fast.serve.adapters import Adapter, AdapterBank, read_adapter
from phi3fast.serve.engine import Engine, Job, QueueFull
from phi3fast.serve.errors import APIError, bad_request
from phi3fast.serve.retrieval import NO_MATCH, Indexes, last_user_message, rag_messages, sources_json
from phi3fast.serve.schemas import ChatRequest, not_found
from phi3fast.serve.text import IncrementalDecoder, StopMatcher

RAG_MAX_NEW_TOKENS = 256  # `phi3fast query --model`'s default answer budget, used to fit passages


@dataclass
class ChatResult:
    """Filled in while a chat runs; complete once its pieces are exhausted."""

    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""
    sources: list[dict] | None = None
    _passages: list = field(default_factory=list, repr=False)

    @property
    def usage(self) -> dict[str, int]:
        n, m = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


class Service:
    def __init__(
        self,
        model: Phi3ForCausalLM,
        base_name: str,
        *,
        adapters: dict[str, Path] | None = None,
        indexes: dict[str, Path] | None = None,
        max_batch: int = 8,
        max_queue: int = 64,
        max_context: int | None = None,
    ) -> None:
        cfg = model.config
        limit = cfg.max_position_embeddings
        if cfg.rope_scaling is not None:
            # LongRoPE switches every position's factors past the original window; one batch must share them.
            limit = cfg.original_max_position_embeddings
        if max_context is None:
            max_context = limit
        if not 2 <= max_context <= limit:
            raise ArgumentError("max_context", f"must be from 2 to {limit} for this model, got {max_context}")
        if max_batch < 1:
            raise ArgumentError("max_batch", f"must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ArgumentError("max_queue", f"must be >= 0, got {max_queue}")
        self.model, self.base_name, self.max_context = model, base_name, max_context
        self.bank = AdapterBank(model)
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)
        self.indexes = Indexes(indexes or {})
        self.engine = Engine(model, self.bank, max_batch, max_queue, max_context)

    # ---- models and adapters ----------------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return [self.base_name, *self.bank.names()]

    def add_adapter(self, name: str, path: str | Path) -> Adapter:
        if name == self.base_name:
            raise Phi3FastError(f"adapter name {name!r} is the base model's name")
        if self.bank.get(name) is not None:
            raise Phi3FastError(f"adapter {name!r} already exists")
        adapter = read_adapter(self.model, name, path)
        self.bank.add(adapter)
        return adapter

    def resolve(self, name: str) -> Adapter | None:
        if name == self.base_name:
            return None
        adapter = self.bank.get(name)
        if adapter is None:
            raise not_found("model", name, "model", self.model_names())
        return adapter

    # ---- chat -------------------------------------------------------------------------------------------------

    async def chat(self, req: ChatRequest) -> tuple[ChatResult, AsyncIterator[str]]:
        """Validate and queue a chat request; (its result record, its text pieces). Raises APIError."""
        adapter = self.resolve(req.model)
        result = ChatResult(model=req.model)
        messages = req.messages
        if req.rag is not None:
            messages = await self._rag(req, result)
            if messages is None:
                result.finish_reason = "stop"
                result.text = NO_MATCH
                return result, _once(NO_MATCH)
        try:
            prompt = chat_prompt_ids(self.model, messages)
        except Phi3FastError as e:
            raise bad_request(str(e), "messages") from None
        except Exception as e:  # the checkpoint's template rejects the conversation (e.g. roles out of order)
            raise bad_request(f"the chat template rejects these messages: {e}", "messages") from None
        n = len(prompt)
        result.prompt_tokens = n
        budget = self.max_context - n
        if budget < 1 or (req.max_tokens is not None and req.max_tokens > budget):
            asked = f" + {req.max_tokens} completion tokens" if req.max_tokens is not None else ""
            raise bad_request(
                f"this model's maximum context length is {self.max_context} tokens; the messages hold {n}{asked}",
                "messages",
                "context_length_exceeded",
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(
            prompt=prompt,
            max_tokens=req.max_tokens if req.max_tokens is not None else budget,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            adapter=adapter,
            emit=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
        )
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise APIError(
                429, f"the server is busy ({e}); retry later", code="rate_limit_exceeded"
            ) from None
        return result, self._pieces(job, queue, req.stop, result)

    async def _rag(self, req: ChatRequest, result: ChatResult) -> list[dict[str, str]] | None:
        assert req.rag is not None
        if req.rag.index not in self.indexes:
            raise not_found("index", req.rag.index, "rag.index", self.indexes.names())
        question = last_user_message(req.messages)
        if question is None or not question.strip():
            raise bad_request("a 'rag' request needs a non-empty user message (the question)", "messages")
        results = await asyncio.to_thread(self.indexes.search, req.rag.index, question, req.rag.k)
        result.sources = []
        if not results:
            return None
        budget = req.max_tokens if req.max_tokens is not None else RAG_MAX_NEW_TOKENS
        messages, kept = rag_messages(self.model, question, results, budget, self.max_context)
        result._passages = kept
        result.sources = sources_json(kept, "")
        return messages

    async def _pieces(
        self, job: Job, queue: asyncio.Queue, stops: list[str], result: ChatResult
    ) -> AsyncIterator[str]:
        decoder = IncrementalDecoder(self.model.tokenizer)
        matcher = StopMatcher(stops)
        out: list[str] = []
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    raise APIError(500, f"generation failed: {value}")
                if kind == "end":
                    piece, hit = matcher.feed(decoder.finish())
                    tail = piece if hit else piece + matcher.flush()
                    if tail:
                        out.append(tail)
                        yield tail
                    result.finish_reason = "stop" if hit else str(value)
                    break
                result.completion_tokens += 1
                piece, hit = matcher.feed(decoder.push(int(value)))  # type: ignore[arg-type]
                if piece:
                    out.append(piece)
                    yield piece
                if hit:
                    result.finish_reason = "stop"
                    break
        finally:
            job.cancel()  # done, stopped by a stop string, or the client went away: free the slot
            result.text = "".join(out)
            if result._passages:
                result.sources = sources_json(result._passages, result.text)


async def _once(text: str) -> AsyncIterator[str]:
    yield text
