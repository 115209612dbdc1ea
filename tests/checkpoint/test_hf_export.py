"""Exported Hugging Face directories generate and tokenise like jaxalign (special ids, tokenizer
config, the run's recorded tokenizer), and export/import hygiene: corrupt safetensors named,
`--overwrite`, file modes from the umask, one-line CLI errors."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import pathlib
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxalign import cli, models  # noqa: E402
from jaxalign.checkpoint import load_hf, save_hf  # noqa: E402
from jaxalign.checkpoint import manager as ckpt  # noqa: E402
from jaxalign.data import encode_prompt, get_template, load_tokenizer  # noqa: E402
from jaxalign.errors import CheckpointError  # noqa: E402

pytestmark = pytest.mark.hf
ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO_TOKENIZER = "data/demo/tokenizer.model"  # relative, as a run's config records it
PLAIN = get_template("plain")
CONFIG = models.get_preset("tiny-64")  # vocab 512 >= the demo tokenizer's 256
# Bigram chain the constructed model follows greedily: "\n" -> "▁" -> "1" -> "2" -> EOS, i.e. the
# response "12" to any plain-template prompt (which ends with "\n"), like the demo SFT model.
CHAIN = {4: 213, 213: 216, 216: 223, 223: 2}


def _demo_prompts(n: int) -> list[str]:
    out = []
    for name in ("sft_eval.jsonl", "prompts_eval.jsonl"):
        with open(ROOT / "data/demo" / name) as f:
            out += [json.loads(line)["prompt"] for line in f][:n]
    return out


def _prompt_ids(tok, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    return encode_prompt(tok, PLAIN, messages, None, max_prompt_len=64)


def _bigram_params() -> dict:
    """tiny-64 params whose greedy continuation of token a is CHAIN[a] whatever came before.

    The attention and MLP outputs are scaled by 0.1, so the final hidden state is mostly the
    current token's (normed) embedding e_a; the unembedding column of CHAIN[a] is 5 e_a / |e_a|,
    every other column is zero: logit(CHAIN[a]) ~ 5 sqrt(D) against ~5 sqrt(D) cos(e_a, e_b).
    """
    params = models.init_params(CONFIG, jax.random.key(0))
    params = jax.tree.map(np.array, params)
    params["layers"]["attn"]["o_proj"]["kernel"] *= 0.1
    params["layers"]["mlp"]["down_proj"]["kernel"] *= 0.1
    embedding = params["embed"]["embedding"]
    unembed = np.zeros_like(params["unembed"]["kernel"])
    for a, b in CHAIN.items():
        unembed[:, b] = 5.0 * embedding[a] / np.linalg.norm(embedding[a])
    params["unembed"]["kernel"] = unembed
    return params


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, tokens):
    return models.logits(config, params, models.forward(config, params, tokens))


def _greedy(config, params, prompt: list[int], max_new: int, eos: int) -> list[int]:
    """jaxalign's greedy continuation: full forwards on one padded row of fixed width (causal,
    so the padding after the last real token does not change its logits; one compilation)."""
    ids = list(prompt)
    while len(ids) < len(prompt) + max_new:
        row = jnp.asarray([ids + [0] * (64 - len(ids))], jnp.int32)
        ids.append(int(jnp.argmax(_logits(config, params, row)[0, len(ids) - 1])))
        if ids[-1] == eos:
            break
    return ids[len(prompt) :]


def _save_run(workdir: pathlib.Path, params: dict, tokenizer: str) -> None:
    """A checkpoint as a training run leaves it: params + the config record naming the tokenizer."""
    manager = ckpt.make_manager(workdir, keep=1, async_save=False)
    record = {"tokenizer": tokenizer, "model_config": dataclasses.asdict(CONFIG)}
    ckpt.save(manager, 10, {"params": params}, {}, record)
    manager.wait_until_finished()
    manager.close()


def _main(*argv) -> tuple[int, str, str]:
    """`jaxalign ...` in process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([str(a) for a in argv])
            status = 0
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    _save_run(workdir, _bigram_params(), DEMO_TOKENIZER)
    return workdir


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """`jaxalign convert to-hf` of the run, run from the repository root, no --tokenizer."""
    out = tmp_path_factory.mktemp("export") / "hf"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        status, stdout, stderr = _main("convert", "to-hf", "--checkpoint", run_dir, "--out", out)
    finally:
        os.chdir(cwd)
    assert status == 0, stderr
    return out, stdout


def test_export_ships_the_runs_tokenizer_and_special_ids(exported):
    out, stdout = exported
    assert f"tokenizer: {DEMO_TOKENIZER} (recorded by the run" in stdout
    assert (out / "tokenizer.model").read_bytes() == (ROOT / DEMO_TOKENIZER).read_bytes()
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}  # the demo model's spec
    hf_config = json.loads((out / "config.json").read_text())
    assert {k: hf_config[k] for k in ids} == ids
    assert json.loads((out / "generation_config.json").read_text()) == ids
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "LlamaTokenizer"
    assert tok_config["add_bos_token"] is True and tok_config["add_eos_token"] is False
    assert tok_config["add_prefix_space"] is True
    tokens = {k: tok_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    assert tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                      "pad_token": "<pad>"}  # fmt: skip


def test_auto_tokenizer_alone_encodes_demo_prompts_like_jaxalign(exported):
    """(a) of the issue: `AutoTokenizer(out)(prompt)` ids = jaxalign's prompt ids, BOS first."""
    tok = transformers.AutoTokenizer.from_pretrained(exported[0])
    ours = load_tokenizer(ROOT / DEMO_TOKENIZER)
    prompts = _demo_prompts(100)
    for prompt in prompts:
        text = PLAIN.render_prompt([{"role": "user", "content": prompt}], None)
        assert tok(text)["input_ids"] == _prompt_ids(ours, prompt), prompt
    assert _prompt_ids(ours, prompts[0])[0] == ours.bos_id == 1
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)


def test_exported_model_generate_stops_at_eos_and_decodes_like_jaxalign(exported):
    """(b) and (c): greedy `generate` with the exported configs alone gives jaxalign's tokens,
    ends with EOS (and stops there), and both tokenizers decode them to the same text."""
    out = exported[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(ROOT / DEMO_TOKENIZER)
    params = _bigram_params()  # what the run saved
    for prompt in _demo_prompts(2):
        prompt_ids = _prompt_ids(ours, prompt)
        want = _greedy(CONFIG, params, prompt_ids, 10, ours.eos_id)
        assert want == [213, 216, 223, 2]  # the construction holds in jaxalign
        text = PLAIN.render_prompt([{"role": "user", "content": prompt}], None)
        inputs = tok(text, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        new = generated[0, len(prompt_ids) :].tolist()
        assert new == want
        assert new[-1] == tok.eos_token_id
        assert tok.decode(new, skip_special_tokens=True) == ours.decode(want) == "12"
    assert model.generation_config.eos_token_id == 2


@pytest.mark.slow
def test_sft_demo_model_exported_stops_at_eos(tmp_path, monkeypatch):
    """The issue's case end to end: a short SFT run on the demo task (it learns to end answers
    with EOS), `jaxalign convert to-hf` with no --tokenizer, then transformers alone: same prompt
    ids, same greedy tokens ending with EOS, same decoded text as jaxalign. Fast sibling: the
    constructed-model tests above."""
    from jaxalign.checkpoint import convert
    from jaxalign.config import apply_overrides, load_config
    from jaxalign.train import train

    monkeypatch.chdir(ROOT)  # the config's data and tokenizer paths are relative to the repo
    config = load_config("configs/sft/tiny.py:steps=60")
    config = apply_overrides(config, ["eval_every=0", "log_every=30", "checkpoint.every=60"])
    train(config, tmp_path / "run")
    status, stdout, err = _main("convert", "to-hf", "--checkpoint", tmp_path / "run",
                                "--out", tmp_path / "hf")  # fmt: skip
    assert status == 0, err
    assert f"tokenizer: {DEMO_TOKENIZER} (recorded by the run" in stdout

    model_config = convert.read_model_config(tmp_path / "run")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        models.abstract_params(model_config),
    )
    params = ckpt.load_params(tmp_path / "run", abstract)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(DEMO_TOKENIZER)
    for prompt in _demo_prompts(5):
        prompt_ids = _prompt_ids(ours, prompt)
        want = _greedy(model_config, params, prompt_ids, 8, ours.eos_id)
        text = PLAIN.render_prompt([{"role": "user", "content": prompt}], None)
        inputs = tok(text, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == prompt_ids
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        new = generated[0, len(prompt_ids) :].tolist()
        assert new == want and new[-1] == ours.eos_id, (prompt, new, want)
        assert tok.decode(new, skip_special_tokens=True) == ours.decode(want)


def test_sentencepiece_without_dummy_prefix(tmp_path):
    """`add_prefix_space` follows the model's add_dummy_prefix: a model trained without it
    tokenises demo prompts like jaxalign too (with the LlamaTokenizer default it would not)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(ROOT / "data/demo/corpus.txt"),
        model_writer=model,
        model_type="bpe",
        vocab_size=256,
        split_digits=True,
        user_defined_symbols=["\n"],
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        num_threads=1,
        minloglevel=2,
    )
    (tmp_path / "nodummy.model").write_bytes(model.getvalue())
    out = save_hf(CONFIG, _bigram_params(), tmp_path / "hf", tokenizer=tmp_path / "nodummy.model")
    assert (out / "tokenizer.model").is_file()  # shipped under the name transformers reads
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["add_prefix_space"] is False
    assert tok_config["pad_token"] == "</s>"  # no pad piece: jaxalign pads with EOS
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 2
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(tmp_path / "nodummy.model")
    for prompt in _demo_prompts(50):
        text = PLAIN.render_prompt([{"role": "user", "content": prompt}], None)
        assert tok(text)["input_ids"] == _prompt_ids(ours, prompt), prompt


def _word_tokenizer(path: pathlib.Path, specials: list[str], post: str | None) -> None:
    """A bare HF tokenizer.json: WordLevel over w0..w199 plus `specials` (registered as special
    added tokens, as real tokenizer.json files do); `post` = a post-processor template."""
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers, processors
    from tokenizers import models as tok_models

    vocab = {f"w{i}": i for i in range(200)} | {s: 200 + i for i, s in enumerate(specials)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    if post is not None:  # a template that does NOT match jaxalign's [BOS] + text
        tok.post_processor = processors.TemplateProcessing(
            single=post, special_tokens=[(s, vocab[s]) for s in specials if s in post]
        )
    tok.save(str(path))


@pytest.mark.parametrize(
    "specials, post, bos",
    [
        (["<unk>", "<s>", "</s>", "<pad>"], "$A </s>", 201),
        (["<unk>", "<|endoftext|>"], None, None),
    ],
    ids=["bos-eos-pad", "eos-only"],
)
def test_bare_tokenizer_json_gets_a_config_that_adds_bos_like_jaxalign(
    tmp_path, specials, post, bos
):
    _word_tokenizer(tmp_path / "vocab.json", specials, post)
    out = save_hf(CONFIG, _bigram_params(), tmp_path / "hf", tokenizer=tmp_path / "vocab.json")
    ours = load_tokenizer(tmp_path / "vocab.json")
    assert (ours.bos_id if ours.bos_id >= 0 else None) == bos
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config.get("bos_token") == ("<s>" if bos is not None else None)
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config.get("bos_token_id") == bos
    assert (hf_config["eos_token_id"], hf_config["pad_token_id"]) == (ours.eos_id, ours.pad_id)

    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "w3 w14 w159 w0"
    want = ([bos] if bos is not None else []) + ours.encode(text)
    assert want[-4:] == [3, 14, 159, 0]
    assert tok(text)["input_ids"] == want
    ids = [*ours.encode(text), ours.eos_id]
    assert tok.decode(ids, skip_special_tokens=True) == ours.decode(ids) == text
    assert tok.eos_token_id == ours.eos_id


# ----------------------------------------------------------------------------- hygiene


def _write_model(directory: pathlib.Path, **kwargs) -> pathlib.Path:
    return save_hf(CONFIG, _bigram_params(), directory, **kwargs)


@pytest.mark.parametrize("damage", ["truncated", "garbage-header"])
def test_corrupt_safetensors_is_named_in_load_hf_and_from_hf(tmp_path, damage):
    hf = _write_model(tmp_path / "hf")
    file = hf / "model.safetensors"
    data = file.read_bytes()
    if damage == "truncated":
        file.write_bytes(data[: len(data) // 2])
    else:
        file.write_bytes(b"\xff" * 8 + data[8:])  # header length field: absurd
    with pytest.raises(CheckpointError, match=f"{file}: not a readable safetensors file"):
        load_hf(hf)

    status, _, err = _main("convert", "from-hf", "--hf", hf, "--out", tmp_path / "ckpt")
    assert status == 2
    assert err.count("\n") == 1 and err.startswith(f"jaxalign: {file}: not a readable")
    assert not (tmp_path / "ckpt").exists()


def test_corrupt_shard_and_index_are_named(tmp_path):
    hf = _write_model(tmp_path / "hf", max_shard_size="60KB")
    shards = sorted(hf.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{shards[1]}: not a readable safetensors file"):
        load_hf(hf)
    index = hf / "model.safetensors.index.json"
    index.write_text(index.read_text()[:50])
    with pytest.raises(CheckpointError, match=f"{index}: not valid JSON"):
        load_hf(hf)


def test_to_hf_overwrite_through_the_cli(run_dir, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("x")
    argv = ("convert", "to-hf", "--checkpoint", run_dir, "--out", out, "--tokenizer",
            ROOT / DEMO_TOKENIZER)  # fmt: skip
    status, _, err = _main(*argv)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"jaxalign: {out}: already exists") and "--overwrite" in err
    assert (out / "old.txt").is_file()

    status, stdout, err = _main(*argv, "--overwrite")
    assert status == 0, err
    assert f"wrote {out}" in stdout and "tokenizer:" not in stdout  # given explicitly
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary left over


@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_exported_files_get_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        out = _write_model(tmp_path / "hf", tokenizer=ROOT / DEMO_TOKENIZER, max_shard_size="60KB")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    files = list(out.iterdir())
    assert len(files) > 5 and {p.name for p in files} >= {"config.json", "tokenizer.model"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
        p.name: oct(file_mode) for p in files
    }


def test_convert_errors_are_one_line_with_status_2(run_dir, tmp_path):
    cases = [
        (("convert", "to-hf", "--out", tmp_path / "a"), "convert to-hf needs --checkpoint"),
        (("convert", "from-hf", "--out", tmp_path / "a"), "convert from-hf needs --hf"),
        (
            ("convert", "to-hf", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "a"),
            f"{tmp_path / 'nope' / 'checkpoints'}: no checkpoint",
        ),
        (
            ("convert", "to-hf", "--checkpoint", run_dir, "--out", tmp_path / "a",
             "--tokenizer", tmp_path / "missing.model"),
            f"tokenizer={tmp_path / 'missing.model'}: no such file or directory",
        ),
        (
            ("convert", "to-hf", "--checkpoint", run_dir, "--out", tmp_path / "a",
             "--dtype", "int8"),
            "dtype 'int8'; expected one of",
        ),
        (
            ("convert", "to-hf", "--checkpoint", run_dir, "--out", tmp_path / "a",
             "--config.steps=3"),
            "convert takes no --config overrides",
        ),
    ]  # fmt: skip
    for argv, message in cases:
        status, _, err = _main(*argv)
        assert status == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("jaxalign: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_unreadable_tokenizer_is_named(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match=f"tokenizer={tmp_path / 'bad.model'}: cannot be"):
        _write_model(tmp_path / "hf", tokenizer=tmp_path / "bad.model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.model"]
