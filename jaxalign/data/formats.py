"""Record formats (SFT, preference pairs, unpaired, prompts) and their tokenisation + truncation.

Accepted JSONL records (one JSON object per line; an optional string field ``system`` on any
record adds a per-example system message, see `jaxalign.data.templates`):

- SFT: ``{"prompt": str | messages, "completion": str | messages}`` or ``{"messages": [...]}`` whose
  last message is the assistant response.
- Pair: ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}``. When
  chosen / rejected are message lists they continue the prompt messages, unless they begin with
  the prompt's turns themselves (UltraFeedback style: ``prompt`` a string, ``chosen`` the whole
  conversation), in which case they are the whole conversation. Without ``prompt`` ("implicit
  prompt"), message lists must be whole conversations sharing everything before their final
  assistant turn, and strings are full transcripts (Anthropic HH style, `split_transcripts`): the
  prompt is their longest common beginning that ends with ``"\\n\\nAssistant:"``.
- Unpaired: ``{"prompt": ..., "completion": ..., "label": bool}`` (True = desirable).
- Negatives (D2O): ``{"prompt": ..., "rejected": str | messages, "samples": [K strings or message
  lists]}``: a human negative and K self-generated responses (`jaxalign generate --n K
  --samples_field samples`); K is fixed per run (``data.num_samples``). Other fields are ignored.
- Ranked (AFT): ``{"prompt": ..., "correct": [P responses], "incorrect": [N responses]}``: P
  correct and N incorrect chains, P and N fixed per run (``data.num_correct``,
  ``data.num_incorrect``; `parse_ranked`).
- Ratings (multi-objective reward models): ``{"prompt": ..., "response": ..., "ratings": [k
  numbers]}``, k fixed by the reader (`reward.num_objectives`).
- Prompt (RL / evaluation): ``{"prompt": str | messages, ...}``; other fields are kept.
- Contrast (Re-Align): a pair with ``"contrast_prompt": str | messages``, an alternative context
  under which the chosen response is read as well (`parse_contrast`).
- Judgment (CUT): ``{"prompt": str | messages, "response": str, "judgment": str}``; the response
  is read after the prompt and after the prompt with the judgment appended (`parse_judgment`).

A response message list that begins with the prompt's turns is the whole conversation in every
format (SFT and unpaired ``completion`` too).

A parser returns a normalised example ``{"messages": prefix, "system": str | None, "responses":
[...]}`` (one response for SFT / unpaired, [chosen, rejected] for pairs; with ``"prompts"``, one
prefix per response) or raises `RecordError` naming the field.

Tokenisation (`tokenize_example`) and the truncation policy, with N = max_len + 1 tokens per
sequence (a sequence of n + 1 tokens fills n model positions: inputs ids[:-1], targets ids[1:]):

    prompt   = [BOS] + encode(template.render_prompt(messages, system))  (BOS if any)
    response = encode(template.render_response(text, messages, system)) + [EOS]
               (EOS not doubled). A tokenizer chat template (`jaxalign.data.templates`) adds no
               EOS (its own end of turn ends the response), and the conversation is tokenised in
               one piece: prompt = its tokens shared with encode(prompt text), response = the rest
    1. if len(prompt) > max_prompt_len: keep BOS and the LAST max_prompt_len - 1 prompt tokens
       (the prompt is cut from the left, so the text right before the response survives);
    2. if len(prompt) + len(response) > N: keep the FIRST N - len(prompt) response tokens
       (the response start is kept; a cut response has no EOS).

`max_prompt_len < max_len` is required, so a response always keeps at least two tokens and is never
empty; an empty (or whitespace-only) response text is a `RecordError`.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from jaxalign.data.errors import RecordError
from jaxalign.data.templates import Template, check_messages
from jaxalign.errors import ConfigError

_TEXT_OR_MESSAGES = "a string or a list of messages"
# Where an assistant turn starts in an Anthropic HH transcript ("\n\nHuman: ...\n\nAssistant: ...").
ASSISTANT_MARKER = "\n\nAssistant:"


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
        msgs = check_messages(value, field)
        has_prompt = prompt and len(msgs) > len(prompt) and msgs[: len(prompt)] == prompt
        conv = msgs if has_prompt else (prompt or []) + msgs
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


def parse_sft(rec: dict, extra_fields: tuple[str, ...] = ()) -> dict:
    """An SFT record -> ``{"messages", "system", "responses": [text], ...}``."""
    if "messages" in rec and "completion" not in rec:
        prefix, text = _split_conversation(check_messages(rec["messages"], "messages"), "messages")
        out = {"messages": prefix, "system": _system(rec), "responses": [text]}
    else:
        prompt = _optional_prompt(rec)
        prefix, text = _response(rec, "completion", prompt)
        out = {
            "messages": prompt if prefix is None else prefix,
            "system": _system(rec),
            "responses": [text],
        }
    return out | _extras(rec, extra_fields)


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen response, rejected response)`` of two full transcripts (Anthropic HH).

    The prompt is the longest common beginning of `chosen` and `rejected` that ends with
    ``ASSISTANT_MARKER`` ("\\n\\nAssistant:"); each response is the rest of its transcript (so it
    keeps the space after the colon). Chosen ``"\\n\\nHuman: Hi\\n\\nAssistant: Hello!"`` and
    rejected ``"\\n\\nHuman: Hi\\n\\nAssistant: Go away."`` give the prompt
    ``"\\n\\nHuman: Hi\\n\\nAssistant:"`` and the responses ``" Hello!"`` and ``" Go away."``;
    earlier turns that both share stay in the prompt.
    """
    common = os.path.commonprefix([chosen, rejected])
    at = common.rfind(ASSISTANT_MARKER)
    if at < 0:
        raise RecordError(
            "prompt",
            "is missing",
            "a string or a list of messages, or chosen and rejected transcripts whose common "
            f"beginning ends with {json.dumps(ASSISTANT_MARKER)}",
        )
    cut = at + len(ASSISTANT_MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def parse_pair(rec: dict, extra_fields: tuple[str, ...] = ()) -> dict:
    """A preference pair -> ``{"messages", "system", "responses": [chosen, rejected], ...}``."""
    prompt = _optional_prompt(rec)
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
        text, chosen, rejected = split_transcripts(chosen, rejected)
        rec = rec | {"prompt": text, "chosen": chosen, "rejected": rejected}
        prompt = _prompt_messages(text)
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


def parse_negatives(rec: dict, num_samples: int, extra_fields: tuple[str, ...] = ()) -> dict:
    """A D2O record -> ``{"messages", "system", "responses": [rejected, *samples], ...}``; a
    `samples` list of another length than `num_samples` is a `RecordError`."""
    prompt = _optional_prompt(rec)
    if prompt is None:
        raise RecordError("prompt", "is missing", _TEXT_OR_MESSAGES)
    samples = _get(rec, "samples", f"a list of {num_samples} responses (data.num_samples)")
    if not isinstance(samples, list) or len(samples) != num_samples:
        got = f"{len(samples)} responses" if isinstance(samples, list) else type(samples).__name__
        raise RecordError(
            "samples", f"has {got}", f"a list of {num_samples} responses (data.num_samples)"
        )
    responses = []
    for i, field in enumerate(["rejected", *(f"samples[{k}]" for k in range(num_samples))]):
        value = rec["rejected"] if i == 0 else samples[i - 1]
        prefix, text = _response({"prompt": rec["prompt"], field: value}, field, prompt)
        if prefix not in (None, prompt):
            raise RecordError(field, "continues another conversation", "the record's prompt")
        responses.append(text)
    out = {"messages": prompt, "system": _system(rec), "responses": responses}
    return out | _extras(rec, extra_fields)


def parse_ranked(
    rec: dict, num_correct: int, num_incorrect: int, extra_fields: tuple[str, ...] = ()
) -> dict:
    """An AFT record ``{prompt, correct: [P], incorrect: [N]}`` -> ``{"messages", "system",
    "responses": [*correct, *incorrect], ...}``; a list of another length than ``num_correct``
    / ``num_incorrect`` (``data.num_correct`` / ``data.num_incorrect``) is a `RecordError`."""
    prompt = _optional_prompt(rec)
    if prompt is None:
        raise RecordError("prompt", "is missing", _TEXT_OR_MESSAGES)
    responses = []
    for field, count in (("correct", num_correct), ("incorrect", num_incorrect)):
        expected = f"a list of {count} responses (data.num_{field})"
        values = _get(rec, field, expected)
        if not isinstance(values, list) or len(values) != count:
            got = f"{len(values)} responses" if isinstance(values, list) else type(values).__name__
            raise RecordError(field, f"has {got}", expected)
        for k, value in enumerate(values):
            name = f"{field}[{k}]"
            prefix, text = _response({"prompt": rec["prompt"], name: value}, name, prompt)
            if prefix not in (None, prompt):
                raise RecordError(name, "continues another conversation", "the record's prompt")
            responses.append(text)
    out = {"messages": prompt, "system": _system(rec), "responses": responses}
    return out | _extras(rec, extra_fields)


def parse_ratings(rec: dict, num_ratings: int, extra_fields: tuple[str, ...] = ()) -> dict:
    """A rated response -> ``{"messages", "system", "responses": [text], "ratings": [k floats]}``;
    ``ratings`` must be a list of exactly ``num_ratings`` numbers."""
    prompt = _optional_prompt(rec)
    prefix, text = _response(rec, "response", prompt)
    expected = f"a list of {num_ratings} finite numbers"
    ratings = _get(rec, "ratings", expected)
    if not isinstance(ratings, list):
        raise RecordError("ratings", f"has type {type(ratings).__name__}", expected)
    if len(ratings) != num_ratings:
        raise RecordError("ratings", f"has {len(ratings)} values", expected)
    bad = [x for x in ratings if not (_is_number(x) and math.isfinite(x))]
    if bad:
        raise RecordError("ratings", f"holds {bad[0]!r}", expected)
    out = {
        "messages": prompt if prefix is None else prefix,
        "system": _system(rec),
        "responses": [text],
        "ratings": [float(x) for x in ratings],
    }
    out.update(_extras(rec, extra_fields))
    return out


def parse_contrast(rec: dict, extra_fields: tuple[str, ...] = ()) -> dict:
    """A pair with an alternative context ``{"prompt", "chosen", "rejected", "contrast_prompt":
    str | messages}`` (Re-Align) -> three responses: chosen and rejected after the prompt, then
    chosen after ``contrast_prompt`` (``"prompts"``: one prefix per response)."""
    out = parse_pair(rec, extra_fields)
    contrast = _prompt_messages(_get(rec, "contrast_prompt"), "contrast_prompt")
    chosen, rejected = out["responses"]
    return out | {
        "responses": [chosen, rejected, chosen],
        "prompts": [out["messages"], out["messages"], contrast],
    }


# CUT records: the judgment is appended to the prompt's last (user) message after this.
JUDGMENT_PREFIX = "\n\nJudgment: "


def _text(rec: dict, field: str) -> str:
    value = _get(rec, field, "a non-empty string")
    if not isinstance(value, str):
        raise RecordError(field, f"has type {type(value).__name__}", "a non-empty string")
    if not value.strip():
        raise RecordError(field, "is empty", "a non-empty string")
    return value


def parse_judgment(rec: dict, extra_fields: tuple[str, ...] = ()) -> dict:
    """A judged response ``{"prompt": str | messages, "response": str, "judgment": str}`` (CUT)
    -> the same response after two prompts: ``"prompts": [x, x + j]``, where x + j is the prompt
    with ``JUDGMENT_PREFIX + judgment`` appended to its last message (which must be the user's),
    and ``"same_response": True`` (the pipeline keeps the two response tokenisations equal)."""
    prompt = _prompt_messages(_get(rec, "prompt"))
    response = _text(rec, "response")
    judgment = _text(rec, "judgment")
    last = prompt[-1]
    if last["role"] != "user":
        raise RecordError(
            "prompt",
            f'ends with a "{last["role"]}" message',
            "a user message last (the judgment is appended to it)",
        )
    judged = [*prompt[:-1], last | {"content": last["content"] + JUDGMENT_PREFIX + judgment}]
    out = {
        "messages": prompt,
        "system": _system(rec),
        "responses": [response, response],
        "prompts": [prompt, judged],
        "same_response": True,
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


def check_lengths(max_len: int, max_prompt_len: int) -> None:
    """``0 < max_prompt_len < max_len`` (a response keeps at least two tokens), else ConfigError."""
    if not 0 < max_prompt_len < max_len:
        raise ConfigError(
            f"need 0 < max_prompt_len < max_len, got {max_prompt_len}, {max_len} "
            "(data.max_prompt_len, data.max_len)"
        )


def _cut_prompt(bos: list[int], body: list[int], max_prompt_len: int) -> list[int]:
    """BOS + the last tokens of `body`, at most `max_prompt_len` in all; never empty."""
    keep = max_prompt_len - len(bos)
    if len(body) > keep:
        body = body[len(body) - keep :]
    ids = bos + body
    if not ids:
        raise RecordError("prompt", "renders to no tokens", "a prompt (or a tokenizer with BOS)")
    return ids


def bos_ids(tokenizer, template: Template, add_bos: bool) -> list[int]:
    """The BOS id the pipeline puts before a prompt: none when the template writes its own."""
    return [tokenizer.bos_id] if add_bos and template.bos and tokenizer.bos_id >= 0 else []


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
    body = tokenizer.encode(template.render_prompt(messages, system))
    return _cut_prompt(bos_ids(tokenizer, template, add_bos), body, max_prompt_len)


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

    With a tokenizer chat template the whole conversation is tokenised in one piece, as
    ``transformers.apply_chat_template`` does, and the prompt is the tokens it shares with the
    prompt's own tokenisation (all of them unless a token spans the prompt / response boundary,
    which then belongs to the response); otherwise prompt and response are tokenised separately.
    """
    check_lengths(max_len, max_prompt_len)
    prompt_text = template.render_prompt(messages, system)
    response_text = template.render_response(response, messages, system)
    body = tokenizer.encode(prompt_text)
    if template.chat_template:
        whole = tokenizer.encode(prompt_text + response_text)
        shared = next(
            (i for i, (a, b) in enumerate(zip(body, whole, strict=False)) if a != b),
            min(len(body), len(whole)),
        )
        body, resp = whole[:shared], whole[shared:]
    else:
        resp = tokenizer.encode(response_text)
    if template.eos and (not resp or resp[-1] != tokenizer.eos_id):
        resp = resp + [tokenizer.eos_id]
    bos = bos_ids(tokenizer, template, add_bos)
    prompt = _cut_prompt(bos, body, max_prompt_len)
    room = max_len + 1 - len(prompt)
    truncated = len(bos) + len(body) > max_prompt_len or len(resp) > room
    return np.asarray(prompt + resp[:room], np.int32), len(prompt), truncated
