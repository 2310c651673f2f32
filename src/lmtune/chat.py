"""Conversations through a model's own chat template: what ends an assistant turn, one reply rendered
after its history, and dialogues written as text (HH-RLHF's "\n\nHuman: ... \n\nAssistant: ...") read
back into messages. Shared by instruction tuning, the preference tasks and `lmtune predict`."""

from __future__ import annotations

import re

from lmtune.errors import InputError


def end_of_turn_token(tokenizer) -> str | None:
    """The special token a chat template closes an assistant turn with (ChatML's `<|im_end|>`, Gemma's
    `<end_of_turn>`, Llama 3's `<|eot_id|>`), found by rendering a sentinel reply; None when the
    template closes turns with plain text."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    key = (id(tokenizer), template)  # rendered once per tokenizer and template, not once per record
    if key not in _END_OF_TURN:
        _END_OF_TURN[key] = _find_end_of_turn(tokenizer)
    return _END_OF_TURN[key]


_END_OF_TURN: dict[tuple[int, str], str | None] = {}


def _find_end_of_turn(tokenizer) -> str | None:
    sentinel = "\u2063lmtune-reply\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": sentinel}], tokenize=False)
    except Exception:  # noqa: BLE001 -- a template that cannot render this has no usable end token
        return None
    after = text[text.find(sentinel) + len(sentinel):] if sentinel in text else ""
    specials = [t for t in dict.fromkeys([*tokenizer.all_special_tokens, *getattr(tokenizer, "added_tokens_encoder", {})])
                if t and t in after]
    return min(specials, key=after.index) if specials else None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer, setting: str) -> None:
    if not has_chat_template(tokenizer):
        raise InputError(f"{setting} needs a tokenizer with a chat template; this one has none -- use the text format "
                         "with a prompt template instead.")


def user_turn_prompt(tokenizer, text: str, system: str | None = None) -> str:
    """`text` as the user's turn (after `system`'s, if given), with the template's generation prompt."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_turn(tokenizer, history: list[dict], reply: str, end: str | None = None) -> tuple[str, str]:
    """(the history with the template's generation prompt, the reply as the template writes it) -- the
    reply up to and including the end-of-turn token `end`, where the template has one."""
    before = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    through = tokenizer.apply_chat_template([*history, {"role": "assistant", "content": reply}], tokenize=False)
    if not through.startswith(before):
        raise InputError("the tokenizer's chat template renders the conversation differently with and without its "
                         "last reply, so the reply cannot be told from the prompt; use the text format instead.")
    text = through[len(before):]
    if end is not None and end in text:
        text = text[: text.index(end) + len(end)]
    return before, text


def transcript_messages(text: str, roles: dict[str, str], where: str) -> list[dict]:
    """A dialogue written as text, each turn opened by one of `roles`' markers ("\n\nHuman:" -> user),
    as messages. Text before the first marker is refused (it belongs to no one)."""
    markers = sorted(roles, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(m) for m in markers))
    starts = list(pattern.finditer(text))
    if not starts or text[: starts[0].start()].strip():
        raise InputError(f"{where}: the dialogue does not start with a turn marker ({', '.join(map(repr, roles))}); "
                         "set preference.transcript_roles to the markers the data uses.")
    messages = []
    for k, match in enumerate(starts):
        end = starts[k + 1].start() if k + 1 < len(starts) else len(text)
        messages.append({"role": roles[match.group()], "content": text[match.end() : end].strip()})
    return messages
