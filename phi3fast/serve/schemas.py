"""Request validation: every field the server reads is checked here and turned into a typed request; anything
wrong is a 400 naming the field (OpenAI's `param`). Fields the server does not use are ignored, as OpenAI-style
servers do, so clients that send extra options (Open WebUI, LangChain) work."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from phi3fast.model.chat import ROLES
from phi3fast.serve.errors import APIError, bad_request

MAX_STOPS = 4  # OpenAI's limit on `stop`
MAX_K = 50


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the body is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise bad_request("the body must be a JSON object")
    return obj


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _str(obj: dict, key: str, required: bool = True) -> str | None:
    v = obj.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v:
        raise bad_request(f"'{key}' must be a non-empty string", key)
    return v


def _num(obj: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = obj.get(key)
    if v is None:
        return default
    if not _is_num(v) or v > hi or v < lo or (lo_open and v == lo):
        bound = f"{'>' if lo_open else '>='} {lo} and <= {hi}"
        raise bad_request(f"'{key}' must be a number {bound}, got {v!r}", key)
    return float(v)


def _opt_int(obj: dict, key: str, lo: int) -> int | None:
    v = obj.get(key)
    if v is None:
        return None
    if not _is_int(v) or v < lo:
        raise bad_request(f"'{key}' must be an integer >= {lo}, got {v!r}", key)
    return v


def _content(m: dict, i: int) -> str:
    """A message's text: a string, or OpenAI's list of content parts of type 'text'."""
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in c):
        if all(isinstance(p.get("text"), str) for p in c):
            return "".join(p["text"] for p in c)
    raise bad_request(
        f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content"
    )


def _messages(obj: dict) -> list[dict[str, str]]:
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        out.append({"role": m["role"], "content": _content(m, i)})
    return out


@dataclass(frozen=True)
class RagOptions:
    index: str
    k: int = 5


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    stream: bool
    include_usage: bool
    temperature: float
    top_p: float
    max_tokens: int | None
    stop: list[str]
    seed: int | None
    rag: RagOptions | None


def chat_request(obj: dict[str, Any]) -> ChatRequest:
    obj = {k: v for k, v in obj.items() if v is not None}  # null means "not given", as OpenAI reads it
    model = _str(obj, "model")
    messages = _messages(obj)
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    opts = obj.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise bad_request(
            "'stream_options' must be an object with a boolean 'include_usage'", "stream_options"
        )
    n = obj.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise bad_request("only 'n': 1 is supported", "n")
    max_tokens = _opt_int(obj, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _opt_int(obj, "max_tokens", 1)
    stop = obj.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad_request(f"'stop' must be a string or an array of at most {MAX_STOPS} strings", "stop")
    seed = obj.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad_request(f"'seed' must be an integer, got {seed!r}", "seed")
    return ChatRequest(
        model=model,  # type: ignore[arg-type]
        messages=messages,
        stream=stream,
        include_usage=bool(opts.get("include_usage", False)),
        temperature=_num(obj, "temperature", 1.0, 0.0, 2.0),
        top_p=_num(obj, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        max_tokens=max_tokens,
        stop=stops,
        seed=seed,
        rag=_rag(obj.get("rag")),
    )


def _rag(v: Any) -> RagOptions | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise bad_request('\'rag\' must be an object like {"index": "docs", "k": 5}', "rag")
    index = v.get("index")
    if not isinstance(index, str) or not index:
        raise bad_request("'rag.index' must be the name of an index", "rag.index")
    k = v.get("k", 5)
    if not _is_int(k) or not 1 <= k <= MAX_K:
        raise bad_request(f"'rag.k' must be an integer from 1 to {MAX_K}, got {k!r}", "rag.k")
    return RagOptions(index=index, k=k)


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: list[str]
    base64: bool


def embedding_request(obj: dict[str, Any]) -> EmbeddingRequest:
    obj = {k: v for k, v in obj.items() if v is not None}
    model = _str(obj, "model")
    inp = obj.get("input")
    if isinstance(inp, str):
        inputs = [inp]
    elif isinstance(inp, list) and inp and all(isinstance(s, str) for s in inp):
        inputs = list(inp)
    else:
        raise bad_request("'input' must be a string or a non-empty array of strings", "input")
    fmt = obj.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    return EmbeddingRequest(model=model, inputs=inputs, base64=fmt == "base64")  # type: ignore[arg-type]


@dataclass(frozen=True)
class AdapterRequest:
    name: str
    path: str


def adapter_request(obj: dict[str, Any]) -> AdapterRequest:
    name, path = _str(obj, "name"), _str(obj, "path")
    if "/" in name:  # type: ignore[operator]
        raise bad_request("'name' must not contain '/'", "name")
    return AdapterRequest(name=name, path=path)  # type: ignore[arg-type]


def not_found(what: str, name: str, param: str, known: list[str]) -> APIError:
    listed = ", ".join(known) or "none"
    return APIError(
        404, f"{what} {name!r} does not exist (available: {listed})", param=param, code=f"{what}_not_found"
    )
