"""`jaxalign generate` end to end on a short SFT checkpoint (and an exported HF directory):
records, the run's own tokenizer and template, best-of-N, errors named, atomic output."""

import dataclasses
import json
import math
import pathlib

import jax
import numpy as np
import pytest

from jaxalign import cli
from jaxalign import models as M
from jaxalign.checkpoint import manager as ckpt
from jaxalign.checkpoint import save_hf
from jaxalign.config import apply_overrides, load_config, to_dict
from jaxalign.data import load_tokenizer, make_prompt_pipeline
from jaxalign.data.demo_task import judge
from jaxalign.errors import DataError
from jaxalign.sampling import SamplingOptions, generate
from jaxalign.sampling import cli_generate as cg
from jaxalign.sampling.best_of_n import best_of_n, demo_judge
from jaxalign.train import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "data/demo/tokenizer.model")
PROMPTS = ROOT / "data/demo/prompts_eval.jsonl"
STEPS = 6


def _sft_config():
    config = load_config(f"{ROOT / 'configs/sft/tiny.py'}:smoke=True")
    return apply_overrides(
        config,
        [
            f"tokenizer={TOKENIZER}",
            f"data.train={ROOT / 'data/demo/sft_train.jsonl'}",
            f"data.eval={ROOT / 'data/demo/sft_eval.jsonl'}",
        ],
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as `jaxalign train` leaves it (step 0 of the SFT tiny config: params,
    data state and config record), written without training to keep this file fast; the
    `slow` test below generates from a really trained run."""
    workdir = tmp_path_factory.mktemp("sft")
    config = _sft_config()
    model_config = M.get_preset(config.model.preset)
    params = M.init_params(model_config, jax.random.key(0))
    manager = ckpt.make_manager(workdir, async_save=False)
    record = to_dict(config) | {"model_config": dataclasses.asdict(model_config)}
    ckpt.save(manager, 0, {"step": np.int32(0), "params": params}, {"next_index": 0}, record)
    manager.close()
    return workdir


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(PROMPTS.read_text().splitlines(keepends=True)[:5]))
    return path


def _main(capsys, *argv):
    """Runs `jaxalign ...` in this process; returns (exit status, stderr)."""
    try:
        cli.main([str(a) for a in argv])
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def _generate(capsys, model, prompts, out, *flags):
    return _main(
        capsys,
        "generate",
        "--model",
        model,
        "--prompts",
        prompts,
        "--out",
        out,
        "--max_new_tokens",
        STEPS,
        "--batch_size",
        4,
        *flags,
    )


def _lines(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_generate_from_a_checkpoint_writes_one_record_per_completion(
    run_dir, prompts, tmp_path, capsys
):
    out = tmp_path / "out" / "completions.jsonl"
    status, err = _generate(capsys, f"checkpoint:{run_dir}", prompts, out, "--temperature", 0)
    assert status == 0, err
    lines = _lines(out)
    records = [json.loads(x) for x in prompts.read_text().splitlines()]
    assert [x["prompt"] for x in lines] == [r["prompt"] for r in records]
    assert [x["index"] for x in lines] == list(range(5)) and {x["sample"] for x in lines} == {0}
    assert list(out.parent.iterdir()) == [out]  # no temporary file left
    # The same completions as the library with the run's tokenizer, template and params.
    config, params, tokenizer_path, template = cg.load_model(f"checkpoint:{run_dir}")
    assert (tokenizer_path, template) == (TOKENIZER, "plain")
    tokenizer = load_tokenizer(tokenizer_path)
    pipeline = make_prompt_pipeline(
        str(prompts), tokenizer, batch_size=4, max_prompt_len=512, shuffle=False, num_epochs=1
    )
    options = SamplingOptions(
        max_new_tokens=STEPS, temperature=0.0, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id
    )
    want = [
        generate(
            config,
            params,
            batch,
            rng=jax.random.fold_in(jax.random.key(0), b),
            options=options,
            tokenizer=tokenizer,
        )
        for b, batch in enumerate(pipeline)
    ]
    fields = ("text", "finish_reason", "lengths", "logprobs")
    want = {f: np.concatenate([getattr(w, f) for w in want]) for f in fields}
    for i, line in enumerate(lines):
        assert line["completion"] == want["text"][i]
        assert line["finish_reason"] == want["finish_reason"][i]
        assert line["num_tokens"] == want["lengths"][i] <= STEPS
        assert math.isclose(line["logprob"], want["logprobs"][i].sum(), rel_tol=1e-5)


def test_generate_from_an_hf_directory_with_n_samples(prompts, tmp_path, capsys):
    config = M.get_preset("tiny-64")
    params = M.init_params(config, jax.random.key(0))
    hf_dir = save_hf(config, params, tmp_path / "hf", tokenizer=TOKENIZER)
    out = tmp_path / "samples.jsonl"
    status, err = _generate(capsys, f"hf:{hf_dir}", prompts, out, "--n", 2, "--top_p", 0.9)
    assert status == 0, err
    lines = _lines(out)
    assert [(x["index"], x["sample"]) for x in lines] == [(i, s) for i in range(5) for s in (0, 1)]


def test_best_of_n_keeps_the_best_and_writes_its_score(run_dir, prompts, tmp_path, capsys):
    out = tmp_path / "best.jsonl"
    flags = ("--best_of", 3, "--reward", "demo_judge", "--temperature", 1.5)
    status, err = _generate(capsys, f"checkpoint:{run_dir}", prompts, out, *flags)
    assert status == 0, err
    for line in _lines(out):
        assert line["score"] == judge(line["prompt"], line["completion"])
        assert 0 <= line["sample"] < 3


def test_best_of_n_library_keeps_the_max_or_min_and_names_a_bad_reward(run_dir):
    config, params, tokenizer_path, _ = cg.load_model(f"checkpoint:{run_dir}")
    tokenizer = load_tokenizer(tokenizer_path)
    batch = next(
        make_prompt_pipeline(
            str(PROMPTS), tokenizer, batch_size=4, max_prompt_len=64, shuffle=False, num_epochs=1
        )
    )
    options = SamplingOptions(
        max_new_tokens=STEPS, n=3, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id
    )
    length = lambda record, text: float(len(text))  # noqa: E731
    kw = dict(rng=jax.random.key(3), options=options, tokenizer=tokenizer, reward=length)
    best = best_of_n(config, params, batch, **kw)
    worst = best_of_n(config, params, batch, worst=True, **kw)
    np.testing.assert_array_equal(best.score, best.scores.max(axis=1))
    np.testing.assert_array_equal(worst.score, worst.scores.min(axis=1))
    np.testing.assert_array_equal(best.scores, worst.scores)  # same samples, same rng
    assert [len(t) for t in best.result.text] == best.score.tolist()
    np.testing.assert_array_equal(best.result.prompt_index, np.arange(4))
    assert demo_judge(batch["records"][0], batch["records"][0]["answer"]) == 1.0

    def nan_reward(record, text):
        return math.nan

    with pytest.raises(DataError, match=r"reward nan_reward returned nan for prompt 0"):
        best_of_n(config, params, batch, **kw | dict(reward=nan_reward))

    def broken(record, text):
        raise KeyError("answer")

    with pytest.raises(DataError, match=r"reward broken failed on prompt 0: KeyError"):
        best_of_n(config, params, batch, **kw | dict(reward=broken))


@pytest.mark.parametrize(
    "flags,message",
    [
        (("--top_p", 0), "sampling option top_p=0.0: expected in (0, 1]"),
        (("--temperature", -1), "sampling option temperature=-1.0: expected >= 0"),
        (("--best_of", 2), "--best_of needs one of --reward NAME"),
        (("--best_of", 2, "--reward", "judge"), "unknown reward 'judge'; known rewards"),
        (("--best_of", 2, "--n", 2, "--reward", "demo_judge"), "leave --n at 1"),
        (("--tokenizer", "/nonexistent.model"), "--tokenizer: /nonexistent.model"),
    ],
)
def test_bad_options_exit_2_naming_them(run_dir, prompts, tmp_path, capsys, flags, message):
    out = tmp_path / "x.jsonl"
    status, err = _generate(capsys, f"checkpoint:{run_dir}", prompts, out, *flags)
    assert status == 2 and err.startswith("jaxalign: ") and message in err, err
    assert not out.exists()


def test_bad_model_spec_and_missing_run(tmp_path, prompts, capsys):
    status, err = _generate(capsys, "run:/x", prompts, tmp_path / "x.jsonl")
    assert status == 2 and "expected hf:DIR or checkpoint:RUN_DIR" in err
    status, err = _generate(capsys, f"checkpoint:{tmp_path / 'nope'}", prompts, tmp_path / "x")
    assert status == 2 and "no checkpoint" in err


def test_bad_prompts_file_is_named_by_line(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1+2?"}\n{"promt": "What is 3+4?"}\n')
    out = tmp_path / "out.jsonl"
    status, err = _generate(capsys, f"checkpoint:{run_dir}", bad, out)
    assert status == 2 and f"{bad} line 2" in err and '"prompt"' in err, err
    assert list(tmp_path.iterdir()) == [bad]


def test_over_long_prompt_is_refused_naming_the_record(run_dir, tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    long.write_text(
        json.dumps({"prompt": "What is 1+2?"}) + "\n" + json.dumps({"prompt": "9 " * 600}) + "\n"
    )
    status, err = _generate(capsys, f"checkpoint:{run_dir}", long, tmp_path / "out.jsonl")
    assert status == 2 and f"{long} record 2: " in err and "max_seq_len 512" in err, err
    assert list(tmp_path.iterdir()) == [long]


def test_interrupted_run_leaves_the_old_output_untouched(
    run_dir, prompts, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr(cg, "generate", interrupted)
    status, err = _generate(capsys, f"checkpoint:{run_dir}", prompts, out, "--temperature", 0)
    assert status == 130 and "jaxalign: interrupted" in err, err
    assert len(calls) == 2 and out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "prompts.jsonl"]


@pytest.mark.slow
def test_generate_from_a_trained_run(prompts, tmp_path, capsys):
    """A real `jaxalign train` run (SFT smoke, 4 steps) feeds `jaxalign generate` directly."""
    train(_sft_config(), tmp_path / "run")
    out = tmp_path / "out.jsonl"
    status, err = _generate(capsys, f"checkpoint:{tmp_path / 'run'}", prompts, out, "--n", 2)
    assert status == 0, err
    assert len(_lines(out)) == 10
