"""The tokenizer's own chat template (`data.template="tokenizer"`): jaxalign's token ids equal
transformers' `apply_chat_template` ids for Llama 3, Qwen2 (ChatML) and Gemma templates, with
system messages and multi-turn histories; the pipelines use it unchanged. Tokenizers are tiny BPE
models built here; the templates are written out as the models ship them."""

import json
import pathlib

import pytest

from jaxalign.data import (
    DataError,
    get_template,
    load_chat_template,
    load_tokenizer,
    make_pair_pipeline,
    make_prompt_pipeline,
    make_sft_pipeline,
    parse_sft,
    tokenize_example,
)
from jaxalign.data.formats import encode_prompt
from jaxalign.errors import ConfigError

# Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# Qwen2-7B-Instruct (ChatML with a default system message)
QWEN2 = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma 3 (text): a system message goes in front of the first user turn
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
# Gemma 2: refuses system messages
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# The helpers and settings transformers gives a template: strftime_now (Llama 3.1's date line),
# tojson, namespace, loop controls, the {% generation %} tag around assistant text, and
# trim_blocks / lstrip_blocks (block tags on their own indented lines leave no blank text).
HELPERS = """{{ bos_token + '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{% set date_string = strftime_now("%d %b %Y") %}
{{ 'Today Date: ' + date_string }}
{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {{ ' ' + message['content'] | tojson }}
        {% continue %}
    {% endif %}
    {% if ns.turns == 0 %}{{ '<|eot_id|>' }}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {% if message['role'] == 'assistant' %}
        {% generation %}{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}
    {% else %}
        {{ message['content'] + '<|eot_id|>' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{% endif %}
"""

CORPUS = [
    "What is 2+2? It is 4. Be brief. You are a helpful assistant.",
    "Hello there! How are you today? I am fine, thank you.",
    "Say it twice. Yes, twice: four, four. Today Date: 01 Jan 2026",
    'Answer in one word. "Brief" café résumé naïve <ok>',
] * 4

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]
LLAMA3_SPECIALS += ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
TOKENIZERS = {  # name: (kind, special tokens, tokenizer_config.json, chat template)
    "llama3": ("bytelevel", LLAMA3_SPECIALS, {"bos_token": "<|begin_of_text|>"}, LLAMA3),
    "qwen2": (
        "bytelevel",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        QWEN2,
    ),
    "gemma3": ("metaspace", GEMMA_SPECIALS, {"bos_token": "<bos>", "eos_token": "<eos>"}, GEMMA3),
    "gemma2": ("metaspace", GEMMA_SPECIALS, {"bos_token": "<bos>", "eos_token": "<eos>"}, GEMMA2),
    "helpers": ("bytelevel", LLAMA3_SPECIALS, {"bos_token": "<|begin_of_text|>"}, HELPERS),
}
TOKENIZERS["llama3"][2]["eos_token"] = "<|eot_id|>"
TOKENIZERS["helpers"][2]["eos_token"] = "<|eot_id|>"


def _write_tokenizer(directory, name: str):
    """A tiny tokenizer directory in Hugging Face layout: tokenizer.json, tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    kind, specials, config, template = TOKENIZERS[name]
    if kind == "bytelevel":  # GPT-2 / Llama 3 / Qwen style: byte-level BPE after a regex split
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        corpus = CORPUS
    else:  # Gemma style: spaces become "▁", no pre-tokenizer, merges may cross a newline
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Replace("▁", " ")
        # a merge "model\nYes" that spans the end of the generation prompt "<start_of_turn>model\n"
        corpus = CORPUS + ["model\nYes"] * 8
        alphabet = sorted(set("".join(corpus).replace(" ", "▁")) | {"\n", "▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **config, "chat_template": template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tokenizers")
    return {name: _write_tokenizer(root / name, name) for name in TOKENIZERS}


SYSTEM = {"role": "system", "content": 'Be brief, "café" <ok>.'}
CONVERSATIONS = {  # (messages before the response, response)
    "single turn": ([{"role": "user", "content": "What is 2+2?"}], "It is 4."),
    "system": ([SYSTEM, {"role": "user", "content": "What is 2+2?"}], "4"),
    "multi-turn": (
        [
            SYSTEM,
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "Say it twice."},
        ],
        "Yes, twice: four, four.",
    ),
    "spaces and accents": (
        [{"role": "user", "content": "  Hello there! \n"}],
        ' I am fine, "café" résumé ',
    ),
}
CHAT = ("llama3", "qwen2", "gemma3", "helpers")


def _jaxalign(directory, messages, response, system=None):
    tok = load_tokenizer(str(directory))
    template = get_template("tokenizer", tok)
    ids, prompt_len, truncated = tokenize_example(
        tok, template, messages, system, response, max_len=4096, max_prompt_len=2048
    )
    assert not truncated
    return ids.tolist(), prompt_len


@pytest.mark.hf
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", CHAT)
def test_ids_equal_apply_chat_template(tokenizer_dirs, name, conversation):
    import transformers

    directory = tokenizer_dirs[name]
    messages, response = CONVERSATIONS[conversation]
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    full = messages + [{"role": "assistant", "content": response}]
    want = hf.apply_chat_template(full, tokenize=True, return_dict=False)
    want_prompt = hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids, prompt_len = _jaxalign(directory, messages, response)
    assert ids == want
    # the loss starts where generation starts: after the prompt's own tokens (all of them unless
    # a token spans the boundary, which then belongs to the response)
    assert ids[:prompt_len] == want_prompt[:prompt_len]
    assert prompt_len == len(want_prompt) or ids[prompt_len] != want_prompt[prompt_len]
    tok = load_tokenizer(str(directory))
    prompt = encode_prompt(tok, get_template("tokenizer", tok), messages, None, max_prompt_len=2048)
    assert prompt == want_prompt  # the generation prompt of make_prompt_pipeline
    if messages[0]["role"] == "system":  # a record's `system` field is the same system message
        example = parse_sft({"system": messages[0]["content"], "messages": full[1:]})
        assert example["messages"] == messages[1:]
        assert _jaxalign(directory, example["messages"], response, SYSTEM["content"]) == (
            ids,
            prompt_len,
        )


def test_gemma_style_boundary_token_belongs_to_the_response(tokenizer_dirs):
    """Without a pre-tokenizer a merge can span the end of the generation prompt; the whole
    conversation is tokenised in one piece (as transformers does) and that token gets loss."""
    directory = tokenizer_dirs["gemma3"]
    tok = load_tokenizer(str(directory))
    messages, response = [{"role": "user", "content": "Hi"}], "Yes, four."
    prompt = encode_prompt(tok, get_template("tokenizer", tok), messages, None, max_prompt_len=99)
    ids, prompt_len = _jaxalign(directory, messages, response)
    text = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYes, four.<end_of_turn>\n"
    assert ids == [tok.bos_id] + tok.encode(text)
    assert tok.encode("model\nYes") == [ids[prompt_len]]  # the token that spans the boundary
    tail = tok.encode("model\n")  # the prompt's own last tokens, which that token replaces
    assert prompt[-len(tail) :] == tail and ids[:prompt_len] == prompt[: -len(tail)]


def test_rendering_without_transformers(tokenizer_dirs):
    """Independent of transformers: the Llama 3 template renders the documented text, BOS comes
    off the text (added as an id), no EOS is appended, and the ids equal the built-in `llama3`
    template's."""
    tok = load_tokenizer(str(tokenizer_dirs["llama3"]))
    t = get_template("tokenizer", tok)
    assert (t.name, t.bos, t.eos) == ("tokenizer", True, False)
    messages, response = CONVERSATIONS["multi-turn"]
    assert t.render_prompt(messages[1:], system="Be brief.") == t.render_prompt(
        [{"role": "system", "content": "Be brief."}, *messages[1:]]
    )
    assert t.render_prompt(messages[1:], system="Be brief.") == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 4.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nSay it twice.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert t.render_response(response, messages) == response + "<|eot_id|>"
    ids, prompt_len = _jaxalign(tokenizer_dirs["llama3"], messages, response)
    builtin = tokenize_example(
        tok, get_template("llama3"), messages, None, response, max_len=4096, max_prompt_len=2048
    )
    assert (ids, prompt_len) == (builtin[0].tolist(), builtin[1])
    qwen = get_template("tokenizer", load_tokenizer(str(tokenizer_dirs["qwen2"])))
    assert qwen.bos is False  # no bos_token: nothing to strip, no BOS id
    assert qwen.render_response("4", [{"role": "user", "content": "Q"}]) == "4<|im_end|>\n"


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_pipelines_use_the_tokenizer_template(tokenizer_dirs, tmp_path):
    tok = load_tokenizer(str(tokenizer_dirs["qwen2"]))
    messages, response = CONVERSATIONS["multi-turn"]
    full = messages + [{"role": "assistant", "content": response}]
    sft = _write(tmp_path / "sft.jsonl", [{"messages": full}])
    batch = next(
        make_sft_pipeline(sft, tok, batch_size=1, max_len=256, template="tokenizer", num_epochs=1)
    )
    ids, prompt_len = _jaxalign(tokenizer_dirs["qwen2"], messages, response)
    n = len(ids) - 1
    assert batch["tokens"][0, :n].tolist() == ids[:-1]
    assert batch["targets"][0, :n].tolist() == ids[1:]
    assert batch["loss_mask"][0, :n].tolist() == [float(k >= prompt_len - 1) for k in range(n)]
    pairs = _write(
        tmp_path / "pairs.jsonl",
        [{"prompt": messages, "chosen": response, "rejected": "No."}],
    )
    batch = next(make_pair_pipeline(pairs, tok, batch_size=1, max_len=256, template="tokenizer"))
    assert batch["tokens"][0, :n].tolist() == ids[:-1]
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": messages}])
    batch = next(
        make_prompt_pipeline(prompts, tok, batch_size=1, max_prompt_len=128, template="tokenizer")
    )
    assert batch["prompt_tokens"][0, -prompt_len:].tolist() == ids[:prompt_len]


def test_template_errors(tokenizer_dirs, tmp_path):
    gemma2 = load_tokenizer(str(tokenizer_dirs["gemma2"]))
    path = _write(
        tmp_path / "sys.jsonl",
        [
            {"prompt": "Hi", "completion": "Hello"},
            {"system": "S", "prompt": "Hi", "completion": "x"},
        ],
    )
    with pytest.raises(DataError) as e:
        make_sft_pipeline(path, gemma2, batch_size=1, max_len=64, template="tokenizer")
    assert str(e.value) == (
        f'{path} line 2: field "messages" is refused by the chat template (System role not '
        "supported) (expected a conversation it accepts)"
    )
    plain = tmp_path / "plain"
    _write_tokenizer(plain, "llama3")
    config = json.loads((plain / "tokenizer_config.json").read_text())
    (plain / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": None}))
    with pytest.raises(ConfigError, match=r'tokenizer_config.json: no "chat_template"'):
        get_template("tokenizer", load_tokenizer(str(plain)))
    (plain / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ConfigError, match=r"chat_template.jinja: the chat template does not"):
        load_chat_template(str(plain / "tokenizer.json"))
    # chat_template.jinja takes precedence over tokenizer_config.json (as in transformers)
    (plain / "chat_template.jinja").write_text(QWEN2)
    assert load_chat_template(str(plain)).chat_template == QWEN2
    (plain / "chat_template.jinja").unlink()
    named = [{"name": "tool_use", "template": GEMMA2}, {"name": "default", "template": LLAMA3}]
    (plain / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": named}))
    assert load_chat_template(str(plain)).chat_template == LLAMA3
    with pytest.raises(ConfigError, match='unknown template "chatml3"'):
        get_template("chatml3")


def test_inspect_renders_the_chat_template(tokenizer_dirs, tmp_path):
    """`jaxalign data inspect` under data.template="tokenizer": special tokens by name, the
    generation prompt without loss, the template's end of turn with loss."""
    from jaxalign.config import apply_overrides, load_config
    from jaxalign.data import inspect as data_inspect

    messages = [{"role": "user", "content": "What is 2+2?"}]
    pairs = _write(
        tmp_path / "pairs.jsonl", [{"prompt": messages, "chosen": "It is 4.", "rejected": "No."}]
    )
    overrides = [f"tokenizer={tokenizer_dirs['llama3']}", "data.template=tokenizer"]
    dpo = pathlib.Path(__file__).resolve().parents[2] / "configs/dpo/tiny.py"
    config = apply_overrides(load_config(str(dpo)), overrides)
    ins = data_inspect.inspect_data(pairs, config, show=1)
    ids, prompt_len = _jaxalign(tokenizer_dirs["llama3"], messages, "It is 4.")
    assert ins.prompt_lengths.tolist() == [prompt_len]
    assert ins.sequence_lengths[0] == len(ids)
    prompt = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\\n\\n"
    )
    assert f"    [{prompt}]It is 4.<|eot_id|>\n" in ins.shown[0]
    assert ins.shown[0].endswith(f"    [{prompt}]No.<|eot_id|>")
