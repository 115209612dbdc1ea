"""Record formats (SFT, preference pairs, unpaired, prompts) and their tokenisation + truncation.

Accepted JSONL records (one JSON object per line; an optional string field ``system`` on any
record adds a per-example system message, see `jaxalign.data.templates`):

- SFT: ``{"prompt": str | messages, "completion": str | messages}`` or ``{"messages": [...]}`` whose
  last message is the assistant response.
- Pair: ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}``. When
  chosen / rejected are message lists they are appended to the prompt messages; without ``prompt``
  ("implicit prompt") both must be whole conversations sharing everything before their final
  assistant turn.
- Unpaired: ``{"prompt": ..., "completion": ..., "label": bool}`` (True = desirable).
- Prompt (RL / evaluation): ``{"prompt": str | messages, ...}``; other fields are kept.

A parser returns a normalised example ``{"messages": prefix, "system": str | None, "responses":
[...]}`` (one response for SFT / unpaired, [chosen, rejected] for pairs) or raises `RecordError`
naming the field.

Tokenisation (`tokenize_example`) and the truncation policy, with N = max_len + 1 tokens per
sequence (a sequence of n + 1 tokens fills n model positions: inputs ids[:-1], targets ids[1:]):

    prompt   = [BOS] + encode(template.render_prompt(messages, system))  (BOS if any)
    response = encode(template.render_response(text)) + [EOS]           (EOS not doubled)
    1. if len(prompt) > max_prompt_len: keep BOS and the LAST max_prompt_len - 1 prompt tokens
       (the prompt is cut from the left, so the text right before the response survives);
    2. if len(prompt) + len(response) > N: keep the FIRST N - len(prompt) response tokens
       (the response start is kept; a cut response has no EOS).

`max_prompt_len < max_len` is required, so a response always keeps at least two tokens and is never
empty; an empty (or whitespace-only) response text is a `RecordError`.
"""

from __future__ import annotations

import numpy as np

from jaxalign.data.errors import RecordError
from jaxalign.data.templates import Template, check_messages

_TEXT_OR_MESSAGES = "a string or a list of messages"


def _get(rec: dict, field: str, expected: str = _TEXT_OR_MESSAGES):
    if field not in rec or rec[field] is None:
        raise RecordError(field, "is missing", expected)
    return rec[field]


def _prompt_messages(value, field: str = "prompt") -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return check_messages(value, field)
    raise RecordError(field, f"has type {type(value).__name__}", _TEXT_OR_MESSAGES)


def _split_conversation(conv: list[dict], field: str) -> tuple[list[dict], str]:
    last = conv[-1]
    if last["role"] != "assistant":
        raise RecordError(
            field,
            f'ends with a "{last["role"]}" message',
            "the last message to be the assistant response",
        )
    return conv[:-1], _check_response(last["content"], field)


def _check_response(text: str, field: str) -> str:
    if not text.strip():
        raise RecordError(field, "is empty", "a non-empty response")
    return text


def _response(rec: dict, field: str, prompt: list[dict] | None) -> tuple[list[dict] | None, str]:
    """(conversation prefix or None when the prompt field gives it, response text) for a response
    field.
    """
    value = _get(rec, field)
    if isinstance(value, str):
        if prompt is None:
            raise RecordError("prompt", "is missing", "a string or a list of messages")
        return None, _check_response(value, field)
    if isinstance(value, list):
        conv = (prompt or []) + check_messages(value, field)
        prefix, text = _split_conversation(conv, field)
        return prefix, text
    raise RecordError(field, f"has type {type(value).__name__}", _TEXT_OR_MESSAGES)


def _system(rec: dict) -> str | None:
    sys_ = rec.get("system")
    if sys_ is not None and not isinstance(sys_, str):
        raise RecordError("system", f"has type {type(sys_).__name__}", "a string")
    return sys_


def _optional_prompt(rec: dict) -> list[dict] | None:
    return _prompt_messages(rec["prompt"]) if rec.get("prompt") is not None else None


def parse_sft(rec: dict) -> dict:
    """An SFT record -> ``{"messages", "system", "responses": [text]}``."""
    if "messages" in rec and "completion" not in rec:
        prefix, text = _split_conversation(check_messages(rec["messages"], "messages"), "messages")
        return {"messages": prefix, "system": _system(rec), "responses": [text]}
    prompt = _optional_prompt(rec)
    prefix, text = _response(rec, "completion", prompt)
    return {
        "messages": prompt if prefix is None else prefix,
        "system": _system(rec),
        "responses": [text],
    }


def parse_pair(rec: dict, extra_fields: tuple[str, ...] = ()) -> dict:
    """A preference pair -> ``{"messages", "system", "responses": [chosen, rejected], ...}``."""
    prompt = _optional_prompt(rec)
    prefix_c, chosen = _response(rec, "chosen", prompt)
    prefix_r, rejected = _response(rec, "rejected", prompt)
    prefix_c = prompt if prefix_c is None else prefix_c
    prefix_r = prompt if prefix_r is None else prefix_r
    if prefix_c != prefix_r:
        raise RecordError(
            "rejected",
            'has a different conversation before its last turn than "chosen"',
            "chosen and rejected to share the prompt",
        )
    out = {"messages": prefix_c, "system": _system(rec), "responses": [chosen, rejected]}
    out.update(_extras(rec, extra_fields))
    return out


def parse_unpaired(rec: dict, extra_fields: tuple[str, ...] = ()) -> dict:
    """An unpaired record -> ``{"messages", "system", "responses": [text], "label": float}``."""
    prompt = _optional_prompt(rec)
    prefix, text = _response(rec, "completion", prompt)
    label = _get(rec, "label", "a boolean")
    if not isinstance(label, bool):
        raise RecordError("label", f"has type {type(label).__name__}", "a boolean")
    out = {
        "messages": prompt if prefix is None else prefix,
        "system": _system(rec),
        "responses": [text],
        "label": float(label),
    }
    out.update(_extras(rec, extra_fields))
    return out


def parse_prompt(rec: dict) -> dict:
    """A prompt-only record -> ``{"messages", "system", "record": rec}`` (raw record kept)."""
    return {
        "messages": _prompt_messages(_get(rec, "prompt")),
        "system": _system(rec),
        "record": rec,
    }


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _extras(rec: dict, fields: tuple[str, ...]) -> dict:
    """Numeric fields: a number, or a non-empty list of numbers (e.g. MODPO's margin vectors)."""
    out = {}
    for f in fields:
        v = _get(rec, f, "a number")
        if isinstance(v, list) and v and all(map(_is_number, v)):
            out[f] = [float(x) for x in v]
        elif _is_number(v):
            out[f] = float(v)
        else:
            raise RecordError(f, f"has type {type(v).__name__}", "a number")
    return out


def encode_prompt(
    tokenizer,
    template: Template,
    messages: list[dict],
    system: str | None,
    *,
    max_prompt_len: int,
    add_bos: bool = True,
) -> list[int]:
    """Prompt ids (BOS + rendered prompt), cut from the left to `max_prompt_len` (BOS kept)."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id >= 0 else []
    body = tokenizer.encode(template.render_prompt(messages, system))
    keep = max_prompt_len - len(bos)
    if len(body) > keep:
        body = body[len(body) - keep :]
    ids = bos + body
    if not ids:
        raise RecordError("prompt", "renders to no tokens", "a prompt (or a tokenizer with BOS)")
    return ids


def tokenize_example(
    tokenizer,
    template: Template,
    messages: list[dict],
    system: str | None,
    response: str,
    *,
    max_len: int,
    max_prompt_len: int,
    add_bos: bool = True,
) -> tuple[np.ndarray, int, bool]:
    """``(ids int32 [n + 1], prompt_len, truncated)`` for one sequence, truncated by the policy in
    the module doc (``truncated``: the prompt or the response was cut).
    """
    if not 0 < max_prompt_len < max_len:
        raise ValueError(f"need 0 < max_prompt_len < max_len, got {max_prompt_len}, {max_len}")
    prompt = encode_prompt(
        tokenizer, template, messages, system, max_prompt_len=max_prompt_len, add_bos=add_bos
    )
    resp = tokenizer.encode(template.render_response(response))
    if not resp or resp[-1] != tokenizer.eos_id:
        resp = resp + [tokenizer.eos_id]
    room = max_len + 1 - len(prompt)
    # A full prompt has max_prompt_len tokens only when it was cut or fits exactly; re-encode
    # only then to tell the two apart.
    prompt_cut = (
        len(prompt) == max_prompt_len
        and len(
            encode_prompt(
                tokenizer, template, messages, system, max_prompt_len=1 << 30, add_bos=add_bos
            )
        )
        > max_prompt_len
    )
    return np.asarray(prompt + resp[:room], np.int32), len(prompt), prompt_cut or len(resp) > room
