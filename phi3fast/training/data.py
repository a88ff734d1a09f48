"""Training data: JSONL rows -> tokenized samples with next-token targets -> padded or packed batches.

Row formats (one JSON object per line; blank lines are skipped):
- {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}: chat, rendered with the
  tokenizer's chat template; loss only on assistant turns and the marker that ends each (Phi-3's <|end|>,
  ChatML's <|im_end|>, ...; found from the template), which is learned.
- {"prompt": "...", "completion": "..."}: loss on the completion and the closing eos.
- {"text": "..."}: loss on all of it and the closing eos.

Targets are shifted per sample (`labels[t]` is what position t must predict), so packing several samples into
one row never asks a sample's last token to predict the next sample's first one.

Note on pad == eos: Phi-3 pads with <|endoftext|>, its eos. Labels are built from explicit spans, never by
masking a token id, so the end-of-turn and eos tokens a model must learn to emit are always trained.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from phi3fast.errors import Phi3FastError
from phi3fast.kernels.cross_entropy import IGNORE_INDEX
from phi3fast.model.chat import ROLES

END_OF_TURN = "<|end|>"
# Markers of Phi-3's chat format: inside a message they would be read as structure, not text.
RESERVED = ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>")

_PROBE = "\x00phi3fast-probe\x00"

Kind = Literal["chat", "completion", "text"]


@dataclass(frozen=True)
class Example:
    """One validated row. `where` is "FILE:LINE" so later errors (e.g. from the tokenizer) can name it."""

    kind: Kind
    where: str
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) for chat rows
    prompt: str = ""
    completion: str = ""
    text: str = ""


@dataclass(frozen=True)
class Sample:
    """A tokenized example: labels[t] is the target for position t (already shifted), IGNORE_INDEX if none."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: bool = False


@dataclass(frozen=True)
class Row:
    """One row of a batch: a sample, or several samples packed into seq_len tokens (seq_ids 1..k, pad 0)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    position_ids: tuple[int, ...] | None = None
    seq_ids: tuple[int, ...] | None = None

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) input tokens."""
        return len(self.input_ids) if self.seq_ids is None else sum(1 for s in self.seq_ids if s != 0)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64, IGNORE_INDEX where no loss
    position_ids: torch.Tensor | None  # [B, T], restarting per packed sample; None = 0..T-1
    seq_ids: torch.Tensor | None  # [B, T], block-diagonal attention when packed; None = plain causal
    n_tokens: int  # real (non-pad) input tokens

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def _check_text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise Phi3FastError(f"{where}: '{field}' must be a string, got {type(value).__name__}")
    for marker in RESERVED:
        if marker in value:
            raise Phi3FastError(f"{where}: '{field}' contains the reserved chat marker {marker}")
    return value


def parse_row(obj: Any, where: str) -> Example:
    """Validate one decoded JSON row; raise Phi3FastError("FILE:LINE: reason") if it is not a known format."""
    if not isinstance(obj, dict):
        raise Phi3FastError(f"{where}: row must be a JSON object, got {type(obj).__name__}")
    formats = [k for k in ("messages", "prompt", "text") if k in obj]
    if "completion" in obj and "prompt" not in obj:
        raise Phi3FastError(f"{where}: 'completion' without 'prompt'")
    if len(formats) != 1:
        found = f"found {', '.join(formats)}" if formats else "found none"
        raise Phi3FastError(
            f"{where}: a row needs exactly one of 'messages', 'prompt'+'completion' or 'text' ({found})"
        )
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise Phi3FastError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise Phi3FastError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
            role = m.get("role")
            if role not in ROLES:
                raise Phi3FastError(
                    f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}"
                )
            if "content" not in m:
                raise Phi3FastError(f"{where}: messages[{i}] has no 'content'")
            out.append((role, _check_text(m["content"], where, f"messages[{i}].content")))
        if not any(role == "assistant" for role, _ in out):
            raise Phi3FastError(f"{where}: 'messages' has no assistant turn to learn from")
        return Example("chat", where, messages=tuple(out))
    if "prompt" in obj:
        if "completion" not in obj:
            raise Phi3FastError(f"{where}: 'prompt' without 'completion'")
        prompt = _check_text(obj["prompt"], where, "prompt")
        completion = _check_text(obj["completion"], where, "completion")
        if not completion:
            raise Phi3FastError(f"{where}: 'completion' is empty")
        return Example("completion", where, prompt=prompt, completion=completion)
    text = _check_text(obj["text"], where, "text")
    if not text:
        raise Phi3FastError(f"{where}: 'text' is empty")
    return Example("text", where, text=text)


def load_rows(path: str | Path) -> list[Example]:
    """Read and validate every row of a JSONL file before any training starts."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise Phi3FastError(f"{path}: cannot read data file ({e.strerror or e})") from None
    rows = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise Phi3FastError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise Phi3FastError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        rows.append(parse_row(obj, where))
    if not rows:
        raise Phi3FastError(f"{path}: no rows (expected one JSON object per line)")
    return rows


def _shift(ids: list[int], trained: list[bool]) -> tuple[int, ...]:
    """Targets for positions 0..n-1: token t+1 where it is trained, IGNORE_INDEX elsewhere and at the end."""
    return tuple(ids[t + 1] if trained[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)) + (
        IGNORE_INDEX,
    )


_END_OF_TURN_CACHE: dict[tuple[int, str], str] = {}


def end_of_turn_marker(tokenizer: Any) -> str:
    """What ends an assistant turn in this tokenizer's chat template (<|end|>, <|im_end|>, <|eot_id|>, ...),
    found once per template by rendering sentinel conversations (phi3fast.model.chat_turns)."""
    from phi3fast.model.chat_turns import chat_turns, end_of_turn

    key = (id(tokenizer), str(getattr(tokenizer, "chat_template", None)))
    if key not in _END_OF_TURN_CACHE:
        _END_OF_TURN_CACHE[key] = end_of_turn(tokenizer, chat_turns(tokenizer))
    return _END_OF_TURN_CACHE[key]


def _encode_chat(tokenizer: Any, ex: Example) -> tuple[list[int], list[bool]]:
    """Render with the chat template and train on the characters of each assistant turn plus its end-of-turn
    marker (Phi-3's <|end|>, ChatML's <|im_end|>, Llama-3's <|eot_id|>: whatever the template closes it with).

    The assistant spans are found by rendering each prefix with the generation prompt: the template must render
    messages[:i] + generation prompt as a prefix of the full conversation, followed by the content and <|end|>.
    Tokenizing the full text once (with offsets) gives exactly the ids that inference would see.
    """
    msgs = [{"role": r, "content": c} for r, c in ex.messages]
    # The template's own markers (ChatML's <|im_start|>, Llama-3's <|eot_id|>...) inside a message would be read
    # as structure; RESERVED covers Phi-3's before the tokenizer is known.
    for i, (_, content) in enumerate(ex.messages):
        for special in getattr(tokenizer, "all_special_tokens", []):
            if special and special in content:
                raise Phi3FastError(f"{ex.where}: messages[{i}].content contains the special token {special}")
    try:
        marker = end_of_turn_marker(tokenizer)
    except Phi3FastError as e:
        raise Phi3FastError(f"{ex.where}: {e}") from None
    try:
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception as e:  # a template error is about this row's shape (e.g. role order)
        raise Phi3FastError(f"{ex.where}: the chat template rejects this conversation ({e})") from None
    spans = []
    for i, (role, content) in enumerate(ex.messages):
        if role != "assistant":
            continue
        if i:
            prefix = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        else:  # templates refuse an empty conversation: find where an opening assistant turn's content starts
            probe = tokenizer.apply_chat_template([{"role": "assistant", "content": _PROBE}], tokenize=False)
            prefix = probe[: probe.find(_PROBE)] if _PROBE in probe else None
        if prefix is None:
            raise Phi3FastError(
                f"{ex.where}: the chat template drops the content of an opening assistant turn"
            )
        start = len(prefix)
        end = start + len(content)
        if not full.startswith(prefix) or full[start:end] != content or not full[end:].startswith(marker):
            raise Phi3FastError(
                f"{ex.where}: the tokenizer's chat template does not render this assistant turn as "
                f"'<prefix>content{marker}'"
            )
        spans.append((start, end + len(marker)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    trained = [any(a < s_end and b > s_start for s_start, s_end in spans) for a, b in enc["offset_mapping"]]
    return ids, trained


def encode_example(tokenizer: Any, ex: Example, max_len: int | None = None) -> Sample:
    """Tokenize one example with the model's tokenizer; truncate to max_len tokens (marked `truncated`)."""
    if not getattr(tokenizer, "is_fast", False):
        raise Phi3FastError(
            "training needs a fast (Rust) tokenizer: tokenizer.json is missing from the model"
        )
    if ex.kind == "chat":
        ids, trained = _encode_chat(tokenizer, ex)
    else:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise Phi3FastError("the tokenizer has no eos token; 'text' and 'prompt' rows need one")
        head = tokenizer(ex.prompt if ex.kind == "completion" else "", add_special_tokens=True)["input_ids"]
        body_text = ex.completion if ex.kind == "completion" else ex.text
        body = tokenizer(body_text, add_special_tokens=False)["input_ids"] + [eos]
        ids = list(head) + list(body)
        trained = [False] * len(head) + [True] * len(body)
    if len(ids) < 2:
        raise Phi3FastError(f"{ex.where}: tokenizes to fewer than 2 tokens, nothing to learn")
    truncated = max_len is not None and len(ids) > max_len
    if truncated:
        ids, trained = ids[:max_len], trained[:max_len]
    return Sample(tuple(ids), _shift(ids, trained), truncated)


def pack(samples: Sequence[Sample], seq_len: int, pad_id: int) -> list[Row]:
    """Greedily pack whole samples, in order, into rows of exactly seq_len tokens.

    Each sample gets its own seq id (1, 2, ...) and positions restarting at 0, so with the model's
    block-diagonal causal mask no sample attends to another. The tail is padding with seq id 0 and no loss.
    """
    rows: list[Row] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    seq: list[int] = []

    def flush() -> None:
        n_pad = seq_len - len(ids)
        rows.append(
            Row(
                tuple(ids + [pad_id] * n_pad),
                tuple(labels + [IGNORE_INDEX] * n_pad),
                tuple(pos + list(range(n_pad))),
                tuple(seq + [0] * n_pad),
            )
        )
        ids.clear(), labels.clear(), pos.clear(), seq.clear()

    for s in samples:
        assert len(s.input_ids) <= seq_len, "samples are truncated to seq_len before packing"
        if len(ids) + len(s.input_ids) > seq_len:
            flush()
        k = (seq[-1] if seq else 0) + 1
        ids.extend(s.input_ids)
        labels.extend(s.labels)
        pos.extend(range(len(s.input_ids)))
        seq.extend([k] * len(s.input_ids))
    if ids:
        flush()
    return rows


@dataclass(frozen=True)
class DataStats:
    samples: int  # kept
    truncated: int  # longer than seq_len: cut (their closing <|end|>/eos is lost)
    dropped: int  # nothing left to learn within seq_len (the prompt alone fills it)


def build_rows(
    examples: Sequence[Example], tokenizer: Any, seq_len: int, packing: bool
) -> tuple[list[Row], DataStats]:
    """Tokenize every example (errors name FILE:LINE) and form rows."""
    encoded = [encode_example(tokenizer, ex, seq_len) for ex in examples]
    samples = [s for s in encoded if any(t != IGNORE_INDEX for t in s.labels)]
    stats = DataStats(len(samples), sum(s.truncated for s in samples), len(encoded) - len(samples))
    if not samples:
        raise Phi3FastError(
            f"{examples[0].where.rsplit(':', 1)[0]}: no row has a trained token within seq_len {seq_len}"
        )
    if packing:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return pack(samples, seq_len, pad), stats
    return [Row(s.input_ids, s.labels) for s in samples], stats


def collate(rows: Sequence[Row], pad_id: int) -> Batch:
    """Stack rows into tensors. Unpacked rows are right-padded to the longest: under the causal mask no real
    token sees a pad, and pads carry no loss, so no attention mask is needed."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    packed = rows[0].seq_ids is not None
    pos = torch.zeros((len(rows), width), dtype=torch.long) if packed else None
    seq = torch.zeros((len(rows), width), dtype=torch.long) if packed else None
    n_tokens = 0
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        if packed:
            pos[i, :n] = torch.tensor(r.position_ids)
            seq[i, :n] = torch.tensor(r.seq_ids)
            n_tokens += sum(1 for s in r.seq_ids if s != 0)
        else:
            n_tokens += n
    return Batch(ids, labels, pos, seq, n_tokens)


class DataOrder:
    """Row order: epoch e is a permutation seeded by (seed, e); the stream of epochs is cut into global batches.
    The order is a pure function of (seed, step), so resuming needs only the step."""

    def __init__(self, n_rows: int, seed: int) -> None:
        self.n, self.seed, self._epoch, self._perm = n_rows, seed, -1, torch.empty(0, dtype=torch.long)

    def rows(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, self.n)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
            out.append(int(self._perm[offset]))
        return out
