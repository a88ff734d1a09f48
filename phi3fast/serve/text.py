"""From token ids to the text a client sees: incremental detokenization and OpenAI `stop` strings.

The decoder follows phi3fast.generate.detokenize (decode everything so far, send what is new, hold a piece back
while it ends inside a multi-byte character), pushed one token at a time instead of pulled. The stop matcher
holds back the longest tail that could still begin a stop string, so a stop string never reaches the client.
"""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.sent) :] if len(text) > len(self.sent) else ""
        self.sent = text
        return new

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new = text[len(self.sent) :] if len(text) > len(self.sent) else ""
        self.sent = text
        return new


class StopMatcher:
    """feed(piece) -> (text safe to send, whether a stop string was reached)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        buf = self.held + piece
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return buf[:cut], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
