"""Record parsing and the truncation policy."""

import numpy as np
import pytest

from jaxalign.data import (
    RecordError,
    get_template,
    parse_pair,
    parse_sft,
    parse_unpaired,
    tokenize_example,
)


def test_parse_sft_string_and_messages():
    a = parse_sft({"prompt": "P", "completion": "C", "system": "S"})
    assert a == {"messages": [{"role": "user", "content": "P"}], "system": "S", "responses": ["C"]}
    msgs = [{"role": "user", "content": "P"}, {"role": "assistant", "content": "C"}]
    assert parse_sft({"messages": msgs})["messages"] == msgs[:1]
    assert parse_sft({"messages": msgs})["responses"] == ["C"]
    with pytest.raises(RecordError, match='field "messages" ends with a "user" message'):
        parse_sft({"messages": msgs[:1]})


def test_parse_pair_forms():
    conv = [{"role": "user", "content": "P"}]
    a = parse_pair({"prompt": "P", "chosen": "A", "rejected": "B"})
    b = parse_pair(
        {
            "prompt": conv,
            "chosen": [{"role": "assistant", "content": "A"}],
            "rejected": [{"role": "assistant", "content": "B"}],
        }
    )
    c = parse_pair(
        {
            "chosen": conv + [{"role": "assistant", "content": "A"}],
            "rejected": conv + [{"role": "assistant", "content": "B"}],
        }
    )  # implicit prompt
    assert a == b == c == {"messages": conv, "system": None, "responses": ["A", "B"]}
    with pytest.raises(RecordError, match="share the prompt"):
        parse_pair(
            {
                "chosen": conv + [{"role": "assistant", "content": "A"}],
                "rejected": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "B"},
                ],
            }
        )
    assert (
        parse_pair(
            {"prompt": "P", "chosen": "A", "rejected": "B", "margin": 2}, extra_fields=("margin",)
        )["margin"]
        == 2.0
    )


@pytest.mark.parametrize(
    "rec, message",
    [
        (
            {"prompt": "P", "chosen": "A"},
            'field "rejected" is missing (expected a string or a list of messages)',
        ),
        (
            {"prompt": "P", "chosen": "A", "rejected": 3},
            'field "rejected" has type int (expected a string or a list of messages)',
        ),
        ({"prompt": "P", "chosen": " ", "rejected": "B"}, 'field "chosen" is empty'),
        ({"prompt": 1.5, "chosen": "A", "rejected": "B"}, 'field "prompt" has type float'),
        ({"chosen": "A", "rejected": "B"}, 'field "prompt" is missing'),
        (
            {"prompt": "P", "chosen": "A", "rejected": "B", "system": 1},
            'field "system" has type int',
        ),
    ],
)
def test_parse_pair_errors(rec, message):
    with pytest.raises(RecordError) as e:
        parse_pair(rec)
    assert message in str(e.value)


def test_parse_unpaired_label():
    assert parse_unpaired({"prompt": "P", "completion": "C", "label": False})["label"] == 0.0
    with pytest.raises(RecordError, match='field "label" has type int'):
        parse_unpaired({"prompt": "P", "completion": "C", "label": 1})


def test_tokenize_no_truncation(demo_tokenizer):
    tok, t = demo_tokenizer, get_template("plain")
    msgs = [{"role": "user", "content": "What is 1+2?"}]
    ids, plen, _ = tokenize_example(tok, t, msgs, None, "3", max_len=64, max_prompt_len=32)
    prompt = [tok.bos_id] + tok.encode("What is 1+2?\n")
    assert plen == len(prompt)
    assert ids.tolist() == prompt + tok.encode("3") + [tok.eos_id]


def test_truncation_policy(demo_tokenizer):
    tok, t = demo_tokenizer, get_template("plain")
    long_prompt = "The sum of 12 and 30 is 42. " * 5 + "What is 1+2?"
    msgs = [{"role": "user", "content": long_prompt}]
    full_prompt = [tok.bos_id] + tok.encode(long_prompt + "\n")
    response = "1234567890" * 3
    full_resp = tok.encode(response) + [tok.eos_id]
    # 1. prompt cut from the left to max_prompt_len, BOS kept; response whole
    ids, plen, _ = tokenize_example(tok, t, msgs, None, response, max_len=200, max_prompt_len=10)
    assert plen == 10
    assert ids[:plen].tolist() == [tok.bos_id] + full_prompt[-9:]
    assert ids[plen:].tolist() == full_resp
    # 2. then the response is cut from the right (start kept, no EOS); total = max_len + 1 tokens
    ids, plen, _ = tokenize_example(tok, t, msgs, None, response, max_len=20, max_prompt_len=10)
    assert len(ids) == 21 and plen == 10
    assert ids[plen:].tolist() == full_resp[:11]
    # the response is never empty: max_prompt_len < max_len leaves at least two response tokens
    ids, plen, _ = tokenize_example(tok, t, msgs, None, response, max_len=11, max_prompt_len=10)
    assert len(ids) - plen == 2
    with pytest.raises(ValueError, match="max_prompt_len < max_len"):
        tokenize_example(tok, t, msgs, None, response, max_len=10, max_prompt_len=10)
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int32


def test_eos_not_doubled_with_chat_suffix(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jaxalign.data import load_tokenizer

    vocab = {
        "[UNK]": 0,
        "<s>": 1,
        "<|im_end|>": 2,
        "<|im_start|>": 3,
        "user": 4,
        "assistant": 5,
        "hi": 6,
        "yo": 7,
    }
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<s>", "<|im_end|>", "<|im_start|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"), eos="<|im_end|>")
    ids, plen, _ = tokenize_example(
        tok,
        get_template("chatml"),
        [{"role": "user", "content": "hi"}],
        None,
        "yo",
        max_len=32,
        max_prompt_len=16,
    )
    assert ids.tolist() == [1, 3, 4, 6, 2, 3, 5, 7, 2]  # one <|im_end|> ends the response
    assert plen == 7
