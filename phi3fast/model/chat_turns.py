"""The turn structure of any chat template, found by rendering sentinel conversations.

A chat template is a Jinja program; what downstream code needs from it is simpler: for each role, the text
before and after a message's content, the text the template puts before the first message (a BOS), and the
system message it adds when none is given. Rendering conversations whose contents are unique sentinels and
locating those sentinels recovers all of it for the templates chat models ship (Phi-3, ChatML, Llama-3, ...).

Where one turn's closing text ends and the next turn's opening text starts is ambiguous in a single rendering;
it is settled by rendering the same turn last and not last: the closing text is what the two share, compared
token by token (a trailing "<|endoftext|>" and a next "<|user|>" are different tokens, though both start "<|").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phi3fast.errors import Phi3FastError

ROLES = ("system", "user", "assistant")
_S = {"system": "SENTINELsysQ7", "user": "SENTINELuserQ7", "assistant": "SENTINELasstQ7"}


@dataclass(frozen=True)
class ChatTurns:
    head: str  # before the first message (e.g. a BOS token written by the template)
    prefix: dict[str, str]  # role -> text before the content
    suffix: dict[str, str]  # role -> text after the content (the assistant's holds its end-of-turn marker)
    generation_prompt: str  # what add_generation_prompt appends (normally the assistant prefix)
    default_system: str | None  # the system content the template adds when the conversation has none


def _render(tok: Any, messages: list[dict[str, str]], gen: bool) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise Phi3FastError(
            f"the tokenizer's chat template cannot render a {'/'.join(ROLES)} chat ({first})"
        ) from None


def _common_token_prefix(tok: Any, a: str, b: str) -> str:
    ta = tok(a, add_special_tokens=False).input_ids
    tb = tok(b, add_special_tokens=False).input_ids
    n = 0
    while n < min(len(ta), len(tb)) and ta[n] == tb[n]:
        n += 1
    text = tok.decode(ta[:n], skip_special_tokens=False)
    # The decoded prefix must be a prefix of both texts (no normalization in between).
    if not (a.startswith(text) and b.startswith(text)):
        raise Phi3FastError("the tokenizer does not decode its chat markers back to the same text")
    return text


def _after(text: str, sentinel: str) -> str:
    i = text.find(sentinel)
    return text[i + len(sentinel) :]


def _between(text: str, a: str, b: str) -> str:
    i, j = text.find(a), text.find(b)
    if i < 0 or j < 0 or j < i:
        raise Phi3FastError("the tokenizer's chat template drops or reorders message contents")
    return text[i + len(a) : j]


def chat_turns(tok: Any) -> ChatTurns:
    """Analyse `tok.chat_template`; a template that does not wrap turns as prefix + content + suffix is an error."""
    if not getattr(tok, "chat_template", None):
        raise Phi3FastError("the tokenizer has no chat template")
    m = {r: {"role": r, "content": _S[r]} for r in ROLES}
    u2 = {"role": "user", "content": "SENTINELuser2Q7"}
    conv = [m["system"], m["user"], m["assistant"], u2]
    full = _render(tok, conv, False)
    full_gen = _render(tok, conv, True)
    last_asst = _render(tok, conv[:3], False)
    g_sys_user = _between(full, _S["system"], _S["user"])
    g_user_asst = _between(full, _S["user"], _S["assistant"])
    g_asst_user = _between(full, _S["assistant"], u2["content"])
    tail = _after(full, u2["content"])
    tail_gen = _after(full_gen, u2["content"])

    user_suffix = _common_token_prefix(tok, tail, g_user_asst)
    asst_suffix = _common_token_prefix(tok, _after(last_asst, _S["assistant"]), g_asst_user)
    if not g_asst_user.startswith(asst_suffix) or not g_user_asst.startswith(user_suffix):
        raise Phi3FastError("the tokenizer's chat template does not end turns the same way each time")
    user_prefix = g_asst_user[len(asst_suffix) :]
    asst_prefix = g_user_asst[len(user_suffix) :]
    if not g_sys_user.endswith(user_prefix):
        raise Phi3FastError(
            "the tokenizer's chat template opens user turns differently after a system message"
        )
    sys_suffix = g_sys_user[: len(g_sys_user) - len(user_prefix)]
    if not tail_gen.startswith(user_suffix):
        raise Phi3FastError(
            "the tokenizer's chat template ends the last user turn differently with a generation prompt"
        )
    generation_prompt = tail_gen[len(user_suffix) :]
    if not generation_prompt:
        raise Phi3FastError("the tokenizer's chat template has no generation prompt (it cannot open a reply)")

    # Without a system message: what precedes the user's content is head + [default system turn] + user prefix.
    no_sys = _render(tok, [m["user"], m["assistant"]], False)
    before_user = no_sys[: no_sys.find(_S["user"])]
    before_sys = full[: full.find(_S["system"])]
    if not before_user.endswith(user_prefix):
        raise Phi3FastError("the tokenizer's chat template opens the first user turn differently")
    lead = before_user[: len(before_user) - len(user_prefix)]
    default_system = None
    if before_sys.startswith(lead):  # no default system turn: lead is the head (a BOS, or nothing)
        head = lead
    elif (
        lead.startswith(before_sys)
        and lead.endswith(sys_suffix)
        and len(lead) > len(before_sys) + len(sys_suffix)
    ):
        default_system = lead[len(before_sys) : len(lead) - len(sys_suffix)]
        # head + system prefix is known, not where one ends: a system prefix is the user prefix with the role
        # name changed in the templates chat models ship; failing that, a leading BOS is the head.
        parallel = user_prefix.replace("user", "system")
        bos = getattr(tok, "bos_token", None)
        if parallel != user_prefix and before_sys.endswith(parallel):
            head = before_sys[: len(before_sys) - len(parallel)]
        else:
            head = bos if bos and before_sys.startswith(bos) else ""
    else:
        raise Phi3FastError(
            "the tokenizer's chat template adds text before the first user turn that is not a system turn"
        )
    sys_prefix = before_sys[len(head) :]
    return ChatTurns(
        head=head,
        prefix={"system": sys_prefix, "user": user_prefix, "assistant": asst_prefix},
        suffix={"system": sys_suffix, "user": user_suffix, "assistant": asst_suffix},
        generation_prompt=generation_prompt,
        default_system=default_system,
    )


def end_of_turn(tok: Any, turns: ChatTurns) -> str:
    """The part of the assistant's closing text a model learns to emit: through its last special token
    (`<|end|>`, `<|im_end|>`, `<|eot_id|>`), or the closing text without trailing whitespace if it has none."""
    suffix = turns.suffix["assistant"]
    ids = tok(suffix, add_special_tokens=False).input_ids
    special = set(tok.all_special_ids) | {
        i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    last = max((k for k, i in enumerate(ids) if i in special), default=None)
    marker = suffix.rstrip() if last is None else tok.decode(ids[: last + 1], skip_special_tokens=False)
    if not marker:
        raise Phi3FastError("the tokenizer's chat template ends assistant turns with no end-of-turn marker")
    return marker
