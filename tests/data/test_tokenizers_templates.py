"""Tokenizer round trips (SentencePiece and HF tokenizer.json) and chat templates."""

import json

import pytest

from jaxalign.data import TEMPLATES, RecordError, demo_task, get_template, load_tokenizer
from jaxalign.data.templates import check_messages

TEXTS = ["What is 23+58?\n81", "The sum of 12 and 30 is 42.", "Think step by step."]


def test_sentencepiece_round_trip(tmp_path, demo_dir):
    model = tmp_path / "sp.model"
    demo_task.train_sentencepiece(str(demo_dir / "corpus.txt"), str(model), vocab_size=128)
    tok = load_tokenizer(str(model))
    assert tok.vocab_size <= 128
    for t in TEXTS:
        ids = tok.encode(t)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == t
    assert tok.decode([tok.bos_id] + tok.encode(TEXTS[0]) + [tok.eos_id]) == TEXTS[0]


def _hf_wordlevel(tmp_path, demo_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "<s>", "</s>"])
    tok.train_from_iterator([" ".join(TEXTS)] * 3, trainer)
    path = tmp_path / "wl" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


def _hf_bpe(tmp_path, demo_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((demo_dir / "corpus.txt").read_text().splitlines()[:500], trainer)
    path = tmp_path / "bpe" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    (path.parent / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>"}})
    )
    return path


def test_hf_wordlevel(tmp_path, demo_dir):
    path = _hf_wordlevel(tmp_path, demo_dir)
    tok = load_tokenizer(str(path.parent))  # directory -> tokenizer.json
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 1)
    ids = tok.encode("The sum of 12 and 30 is 42 .")
    assert tok.decode(ids) == "The sum of 12 and 30 is 42 ."
    assert tok.decode(ids + [tok.eos_id]) == "The sum of 12 and 30 is 42 ."


def test_hf_bpe_with_config_and_special_tokens(tmp_path, demo_dir):
    tok = load_tokenizer(str(_hf_bpe(tmp_path, demo_dir)))
    assert tok.bos_id == -1  # no BOS token in this vocabulary
    assert tok.eos_id == tok._tok.token_to_id("<|im_end|>")
    assert tok.pad_id == tok._tok.token_to_id("<|endoftext|>")
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    # special tokens written in template text encode to their single ids
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok._tok.token_to_id("<|im_start|>") and ids[-1] == tok.eos_id
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(str(tmp_path / "bpe" / "tokenizer.json"), eos="<nope>")


def test_plain_template_with_system(demo_dir):
    t = get_template("plain")
    msgs = [{"role": "user", "content": "What is 1+2?"}]
    assert t.render_prompt(msgs) == "What is 1+2?\n"
    assert t.render_prompt(msgs, system="Be brief.") == "Be brief.\n\nWhat is 1+2?\n"
    assert t.render_response("3") == "3"


def test_chat_templates(demo_dir):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    chatml = TEMPLATES["chatml"].render_prompt(msgs)
    assert chatml == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert TEMPLATES["chatml"].render_response("R") == "R<|im_end|>"
    llama = TEMPLATES["llama3"].render_prompt(msgs[1:], system="S")
    assert llama == (
        "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    with pytest.raises(ValueError, match="unknown template"):
        get_template("nope")


def test_check_messages_errors(demo_dir):
    with pytest.raises(RecordError, match=r'field "m\[1\].role" is \'bot\''):
        check_messages([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "m")
    with pytest.raises(RecordError, match=r'field "m\[0\].content" is missing'):
        check_messages([{"role": "user"}], "m")
    with pytest.raises(RecordError, match='field "m" has type str'):
        check_messages("hi", "m")
