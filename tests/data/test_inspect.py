"""`jaxalign data inspect`: counts, lengths and truncation equal what the run's pipeline does,
examples render with their loss mask, and the CLI prints it (and a PNG) or one-line errors."""

import json
import pathlib

import numpy as np
import pytest

from jaxalign import cli
from jaxalign.config import apply_overrides, load_config
from jaxalign.data import inspect as data_inspect
from jaxalign.data import make_pair_pipeline, make_prompt_pipeline

ROOT = pathlib.Path(__file__).resolve().parents[2]
DPO = str(ROOT / "configs/dpo/tiny.py")
SFT = str(ROOT / "configs/sft/tiny.py")
GRPO = str(ROOT / "configs/grpo/tiny.py")


def _pairs(n):
    """Prompts and responses of growing length, so that some are cut at max_len 24 / 12."""
    return [
        {
            "prompt": "What is 1+2?" + " The sum of 12 and 30 is 42." * (i % 4),
            "chosen": "3" * (1 + 3 * i),
            "rejected": "4",
            "margin": float(i),
        }
        for i in range(n)
    ]


def _write(tmp_path, records, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return str(path)


def _config(*overrides, path=DPO):
    return apply_overrides(load_config(path), list(overrides))


def test_counts_equal_the_pipeline(tmp_path, demo_tokenizer):
    records = _pairs(12)
    path = _write(tmp_path, records)
    tok = demo_tokenizer
    prompts = [1 + len(tok.encode(r["prompt"] + "\n")) for r in records]  # BOS + plain template
    responses = [len(tok.encode(r[k])) + 1 for r in records for k in ("chosen", "rejected")]
    exact_fits = 0
    for max_len in range(16, 31):  # some sequences fit exactly, some by one token less or more
        config = _config(f"data.max_len={max_len}", "data.max_prompt_len=12")
        ins = data_inspect.inspect_data(path, config, show=0)
        assert ins.records == "pair" and ins.num_examples == 12 and ins.num_bad == 0
        assert ins.prompt_lengths.tolist() == prompts
        assert ins.response_lengths.tolist() == responses
        seqs = [prompts[i // 2] + r for i, r in enumerate(responses)]
        assert ins.sequence_lengths.tolist() == seqs
        assert ins.prompts_cut == sum(p > 12 for p in prompts) > 0
        kept = [min(p, 12) + r for p, r in zip(np.repeat(prompts, 2), responses, strict=True)]
        exact_fits += kept.count(max_len + 1)
        assert ins.responses_cut == sum(n > max_len + 1 for n in kept)
        it = make_pair_pipeline(
            path, tok, batch_size=5, max_len=max_len, max_prompt_len=12, shuffle=False, num_epochs=1
        )
        list(it)
        assert ins.examples_cut == it.num_truncated  # what the run counts over one epoch
    assert exact_fits > 0
    text = data_inspect.report(ins, config)
    assert f"prompts cut from the left: {ins.prompts_cut} of 12 examples" in text
    assert f"responses cut from the right: {ins.responses_cut} of 24 sequences" in text
    assert f"examples truncated: {it.num_truncated} of 12" in text


def test_histogram():
    lines = data_inspect.histogram(np.array([3, 3, 4, 5, 5, 5, 12]), bins=5)
    assert lines == [
        f"   3-4  |{'#' * 40}| 3",
        f"   5-6  |{'#' * 40}| 3",
        f"   7-8  |{'':<40}| 0",
        f"   9-10 |{'':<40}| 0",
        f"  11-12 |{'#' * 13:<40}| 1",
    ]


def test_examples_render_with_their_loss_mask(tmp_path):
    path = _write(tmp_path, [{"prompt": "What is 1+2?", "chosen": "3", "rejected": "4"}])
    ins = data_inspect.inspect_data(path, _config(), show=2)
    assert ins.shown == [
        "example 0:\n"
        "  chosen: 12 tokens, 9 prompt + 3 response, 3 with loss\n"
        "    [<s>What is 1+2?\\n]3</s>\n"
        "  rejected: 12 tokens, 9 prompt + 3 response, 3 with loss\n"
        "    [<s>What is 1+2?\\n]4</s>"
    ]
    ins = data_inspect.inspect_data(path, _config("data.train_on_prompt=True"), show=1)
    assert "11 with loss\n    [<s>]What is 1+2?\\n 3</s>" in ins.shown[0]
    short = _config("data.max_len=8", "data.max_prompt_len=4")
    cut = data_inspect.inspect_data(path, short, show=1)
    assert "  chosen: 7 tokens, 4 prompt + 3 response, 3 with loss, truncated\n" in cut.shown[0]
    assert cut.shown[0].count("    [<s>") == 2  # BOS kept, the prompt cut from the left


def test_bad_records_and_prompt_records(tmp_path, demo_tokenizer):
    good = {"prompt": "What is 1+2?", "chosen": "3", "rejected": "4"}
    path = _write(tmp_path, [good, '{"prompt": 1}\n', good])
    ins = data_inspect.inspect_data(path, _config(), show=0)
    assert (ins.num_examples, ins.num_bad) == (2, 1)
    text = data_inspect.report(ins, _config())
    assert "malformed records: 1, the run stops at the first (data.skip_bad_records=False):" in text
    assert f'  {path} line 2: field "prompt" has type int' in text
    text = data_inspect.report(ins, _config("data.skip_bad_records=True"))
    assert "malformed records: 1, skipped (data.skip_bad_records=True):" in text
    # prompt records (the online families' format): prompts only, cut from the left
    grpo = _config("data.max_prompt_len=4", path=GRPO)
    ins = data_inspect.inspect_data(path, grpo, show=1)
    assert ins.records == "prompt" and ins.prompt_lengths.tolist() == [9, 9]
    assert ins.prompts_cut == ins.examples_cut == 2 and len(ins.response_lengths) == 0
    it = make_prompt_pipeline(
        path, demo_tokenizer, batch_size=2, max_prompt_len=4, skip_bad_records=True, num_epochs=1
    )
    list(it)
    assert it.num_truncated == 2  # what the online run counts
    assert ins.shown[0].startswith("example 0:\n  prompt: 4 tokens, truncated\n    [<s>")
    text = data_inspect.report(ins, grpo)
    assert "truncation (data.max_prompt_len=4):" in text
    assert "at most rl.max_new_tokens=8 tokens, rl.group_size=8 per prompt" in text
    assert "response tokens" not in text


def test_record_format_follows_the_trainer():
    assert data_inspect.records_format(_config()) == "pair"
    assert data_inspect.records_format(_config(path=SFT)) == "sft"
    assert data_inspect.records_format(load_config(str(ROOT / "configs/kto/tiny.py"))) == (
        "unpaired"
    )
    assert data_inspect.records_format(load_config(str(ROOT / "configs/npo/tiny.py"))) == "sft"
    assert data_inspect.records_format(_config(path=GRPO)) == "prompt"


def test_cli(tmp_path, capsys):
    path = _write(tmp_path, _pairs(6))
    png = tmp_path / "plots" / "lengths.png"
    args = ["data", "inspect", path, "--config", DPO, "--config.data.max_len=40", "--show", "1"]
    cli.main([*args, "--out", str(png)])
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: 6 examples (pair records), template plain, tokenizer ")
    assert "truncation (data.max_prompt_len=32, data.max_len=40):" in out
    assert "example 0:" in out and "example 1:" not in out
    assert out.rstrip().endswith(f"wrote {png}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["lengths.png"]  # no temporary file left
    for argv, message in [
        (["data", "inspect", str(tmp_path / "none.jsonl"), "--config", DPO], "file not found"),
        (["data", "inspect", path, "--config", DPO, "--config.data.max_lenn=3"], "unknown key"),
        (["data", "inspect", path, "--config", DPO, "--show", "-1"], "--show -1: expected"),
        (
            ["data", "inspect", path, "--config", DPO, "--config.data.max_len=24"],
            "need 0 < max_prompt_len < max_len, got 32, 24 (data.max_prompt_len, data.max_len)",
        ),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("jaxalign: ") and message in err
        assert "\n" not in err
