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
- ``raw``: every turn is its content as is, no generation prompt: for transcripts that carry their
  own turn markers (Anthropic HH's ``"\\n\\nHuman: ... \\n\\nAssistant:"``).
- ``tokenizer``: the tokenizer's own Jinja chat template (`load_chat_template`), below.

A per-example ``system`` field (system-message conditioning) is inserted as the first message unless
the messages already start with a system message, in which case both are kept, the field's text
first.

The tokenizer's chat template (``data.template="tokenizer"``). The ``chat_template`` of the Hugging
Face ``tokenizer_config.json`` next to the tokenizer file (or ``chat_template.jinja`` there, which
takes precedence, as in ``transformers``) is rendered with ``jinja2`` the way
``transformers.apply_chat_template`` renders it: a sandboxed environment with ``trim_blocks`` and
``lstrip_blocks``, the ``raise_exception`` and ``strftime_now`` helpers, a ``tojson`` filter that
keeps non-ASCII text, the ``{% generation %}`` tag, and the tokenizer's special tokens
(``bos_token``, ``eos_token``, ...) as variables. Then

    prompt text   = render(messages, add_generation_prompt=True)
    response text = render(messages + [assistant: response]) minus the prompt text (which must be
                    its prefix; a template that renders them differently is a record error)

so the loss mask starts exactly where the model's generation would start. A leading
``bos_token`` is taken off the text and added as the BOS id by the pipeline (so truncation keeps
it), and no EOS id is appended: the template's own end of turn (``<|eot_id|>``,
``<|im_end|>\\n``, ``<end_of_turn>\\n``) ends the response. The conversation is tokenised in
one piece (`jaxalign.data.formats.tokenize_example`), so the ids equal
``apply_chat_template(messages + [response])`` (tested for Llama 3, Qwen2 / ChatML and Gemma
templates); the loss starts at the first token that is not the prompt's own. A template that prints
today's date (``strftime_now``, e.g. Llama 3.1 without ``date_string``) makes the prompts depend
on the day the data is read.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from jaxalign.data.errors import RecordError
from jaxalign.errors import ConfigError

ROLES = ("system", "user", "assistant")
# The named special tokens transformers passes to a chat template (its `special_tokens_map`).
SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


@dataclasses.dataclass(frozen=True)
class Template:
    """A chat template: turn formats with one ``{content}`` placeholder, or a Jinja chat template.

    Attributes:
      name: template name.
      system: format of a system turn.
      user: format of a user turn.
      assistant: format of an earlier (non-final) assistant turn.
      generation_prompt: appended after the last prompt turn (the assistant header).
      response_suffix: appended after the final response text (end-of-turn marker).
      default_system: system message used when a record has none (None: no system turn).
      chat_template: a Jinja chat template (``tokenizer_config.json``); when set it renders the
        conversation and the turn formats above are unused (module doc).
      special_tokens: ``(name, token)`` pairs the Jinja template sees (``bos_token``, ...).
      bos: the pipeline prepends the tokenizer's BOS id (a Jinja template: it writes bos_token).
      eos: the pipeline appends the tokenizer's EOS id to a response not already ending with it.
    """

    name: str
    system: str = ""
    user: str = ""
    assistant: str = ""
    generation_prompt: str = ""
    response_suffix: str = ""
    default_system: str | None = None
    chat_template: str = ""
    special_tokens: tuple[tuple[str, str], ...] = ()
    bos: bool = True
    eos: bool = True

    def render_prompt(self, messages: list[dict], system: str | None = None) -> str:
        """Render the conversation prefix (everything before the response) as prompt text."""
        if self.chat_template:
            return self._render(_with_system(messages, system), add_generation_prompt=True)
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

    def render_response(
        self, response: str, messages: list[dict] = (), system: str | None = None
    ) -> str:
        """Render the final assistant turn's text (the part that gets loss); a Jinja template
        needs the conversation before it (`messages`, `system`)."""
        if not self.chat_template:
            return response + self.response_suffix
        conversation = _with_system(messages, system)
        prompt = self._render(conversation, add_generation_prompt=True)
        full = self._render(
            conversation + [{"role": "assistant", "content": response}], add_generation_prompt=False
        )
        if not full.startswith(prompt):
            raise RecordError(
                "messages",
                "renders, with the response, into text that does not start with the prompt",
                "a chat template whose prompt (with the generation prompt) is a prefix of the "
                "conversation",
            )
        return full[len(prompt) :]

    def _render(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        """The Jinja template's text, as transformers renders it, without a leading bos_token."""
        special = dict(self.special_tokens)
        try:
            text = _compile(self.chat_template).render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **special,
            )
        except jinja2.TemplateError as e:
            raise RecordError(
                "messages", f"is refused by the chat template ({e})", "a conversation it accepts"
            ) from None
        if self.bos and special.get("bos_token"):
            text = text.removeprefix(special["bos_token"])
        return text


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [dict(m) for m in messages]


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-token markers): renders
    its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format):
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=8)
def _compile(chat_template: str) -> jinja2.Template:
    """The Jinja environment of ``transformers.apply_chat_template``, compiled once per template."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(chat_template)


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
    "raw": Template(name="raw", system="{content}", user="{content}", assistant="{content}"),
}


def load_chat_template(tokenizer_path: str) -> Template:
    """The chat template of the Hugging Face tokenizer at `tokenizer_path` (a tokenizer file or
    its directory): ``chat_template.jinja`` there, else ``tokenizer_config.json``'s
    ``chat_template`` (its "default" one when it holds several), with the special tokens
    that config names. A missing or broken template is a `ConfigError` naming the file."""
    path = str(tokenizer_path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config_file = os.path.join(directory, "tokenizer_config.json")
    jinja_file = os.path.join(directory, "chat_template.jinja")
    config = {}
    if os.path.isfile(config_file):
        try:
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_file}: not valid JSON ({e})") from None
    if os.path.isfile(jinja_file):
        where = jinja_file
        with open(jinja_file, encoding="utf-8") as f:
            source = f.read()
    else:
        where = config_file
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}, ...]
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str) or not source:
        raise ConfigError(
            f'{where}: no "chat_template" (data.template="tokenizer" renders the tokenizer\'s '
            f"chat template; or set data.template to one of {sorted(TEMPLATES)})"
        )
    special = {}
    for key in SPECIAL_TOKENS:
        value = config.get(key)
        if isinstance(value, dict):  # AddedToken serialisation
            value = value.get("content")
        if isinstance(value, str):
            special[key] = value
    try:
        _compile(source)
    except jinja2.TemplateError as e:
        raise ConfigError(f"{where}: the chat template does not compile ({e})") from None
    template = Template(
        name="tokenizer", chat_template=source, special_tokens=tuple(sorted(special.items()))
    )
    # Whether the template writes bos_token at the start, found by rendering one conversation.
    probe = [{"role": "user", "content": "x"}]
    try:
        text = _compile(source).render(
            messages=probe, tools=None, documents=None, add_generation_prompt=True, **special
        )
    except jinja2.TemplateError as e:
        raise ConfigError(f"{where}: the chat template refuses a one-message chat ({e})") from None
    writes_bos = bool(special.get("bos_token")) and text.startswith(special["bos_token"])
    return dataclasses.replace(template, bos=writes_bos, eos=False)


def get_template(template: str | Template, tokenizer=None) -> Template:
    """The named template (see `TEMPLATES`), the chat template of `tokenizer` for "tokenizer"
    (`load_chat_template` of its file), or `template` itself if it is a `Template`."""
    if isinstance(template, Template):
        return template
    if template == "tokenizer":
        path = getattr(tokenizer, "path", None)
        if path is None:
            raise ConfigError('template "tokenizer" needs a tokenizer loaded from its file')
        return load_chat_template(path)
    if template not in TEMPLATES:
        raise ConfigError(
            f'unknown template "{template}" (known: {", ".join(sorted(TEMPLATES))}, tokenizer)'
        )
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
