"""Prompt / chat templates: turn a conversation prefix (+ optional system message) into text.

A record's prompt is normalised to a list of messages ``[{"role": ..., "content": ...}, ...]`` with
roles ``system``, ``user`` and ``assistant`` (a plain string prompt becomes one user message); the
response is the text of the final assistant turn. A `Template` renders

    prompt text   = prefix + system turn + earlier turns + generation_prompt
    response text = response + response_suffix

and the two are tokenised separately, so the prompt / response boundary (the loss mask) is exact.
BOS and EOS are added as token ids by the pipeline, never as text.

Named templates (`TEMPLATES`):

- ``plain``: ``"{prompt}\\n"`` style, used by the bundled demo task: user turns are ``content +
  "\\n"``, a system message is ``content + "\\n\\n"``, no end-of-turn marker (EOS ends the
  response).
- ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` (Qwen 2 / 2.5 / 3 and others); the
  response ends with ``<|im_end|>``.
- ``llama3``: ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``; the response ends
  with ``<|eot_id|>`` (``<|begin_of_text|>`` is the tokenizer's BOS id, added by the pipeline).

A per-example ``system`` field (system-message conditioning) is inserted as the first message unless
the messages already start with a system message, in which case both are kept, the field's text
first.
"""

from __future__ import annotations

import dataclasses

from jaxalign.data.errors import RecordError

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Template:
    """A chat template; each turn format has one ``{content}`` placeholder.

    Attributes:
      name: template name.
      system: format of a system turn.
      user: format of a user turn.
      assistant: format of an earlier (non-final) assistant turn.
      generation_prompt: appended after the last prompt turn (the assistant header).
      response_suffix: appended after the final response text (end-of-turn marker).
      default_system: system message used when a record has none (None: no system turn).
    """

    name: str
    system: str
    user: str
    assistant: str
    generation_prompt: str = ""
    response_suffix: str = ""
    default_system: str | None = None

    def render_prompt(self, messages: list[dict], system: str | None = None) -> str:
        """Render the conversation prefix (everything before the response) as prompt text."""
        msgs = list(messages)
        sys_texts = []
        if system is not None:
            sys_texts.append(system)
        elif self.default_system is not None and not (msgs and msgs[0]["role"] == "system"):
            sys_texts.append(self.default_system)
        parts = [self.system.format(content=s) for s in sys_texts]
        formats = {"system": self.system, "user": self.user, "assistant": self.assistant}
        for m in msgs:
            parts.append(formats[m["role"]].format(content=m["content"]))
        parts.append(self.generation_prompt)
        return "".join(parts)

    def render_response(self, response: str) -> str:
        """Render the final assistant turn's text (the part that gets loss)."""
        return response + self.response_suffix


TEMPLATES: dict[str, Template] = {
    "plain": Template(
        name="plain", system="{content}\n\n", user="{content}\n", assistant="{content}\n"
    ),
    "chatml": Template(
        name="chatml",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
        generation_prompt="<|im_start|>assistant\n",
        response_suffix="<|im_end|>",
    ),
    "llama3": Template(
        name="llama3",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|eot_id|>",
        generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
        response_suffix="<|eot_id|>",
    ),
}


def get_template(template: str | Template) -> Template:
    """Return the named template (see `TEMPLATES`), or `template` itself if it is a `Template`."""
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def check_messages(value: object, field: str) -> list[dict]:
    """Validate a list of ``{"role", "content"}`` messages; raises `RecordError` naming `field`."""
    expected = 'a list of {"role", "content"} messages'
    if not isinstance(value, list) or not value:
        problem = (
            "is an empty list" if isinstance(value, list) else f"has type {type(value).__name__}"
        )
        raise RecordError(field, problem, expected)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError(f"{field}[{i}]", f"has type {type(m).__name__}", expected)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RecordError(f"{field}[{i}].role", f"is {role!r}", f"one of {ROLES}")
        if not isinstance(content, str):
            problem = "is missing" if content is None else f"has type {type(content).__name__}"
            raise RecordError(f"{field}[{i}].content", problem, "a string")
        out.append({"role": role, "content": content})
    return out
