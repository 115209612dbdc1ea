"""`jaxalign generate --config configs/generate/{eft,nudging,genarm}.py`: the shipped configs
with their models overridden to small checkpoints, flags over the config's sampling options,
and the one-line errors (unknown method or key, missing model, vocabulary mismatch)."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from jaxalign import cli
from jaxalign import models as M
from jaxalign.checkpoint import manager as ckpt
from jaxalign.config import apply_overrides, load_config, to_dict

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "data/demo/tokenizer.model")
PROMPTS = ROOT / "data/demo/prompts_eval.jsonl"


def _checkpoint(workdir, seed, vocab_size=512):
    """A run directory at step 0 of the SFT tiny config (random params, the demo tokenizer)."""
    config = apply_overrides(
        load_config(f"{ROOT / 'configs/sft/tiny.py'}:smoke=True"), [f"tokenizer={TOKENIZER}"]
    )
    model_config = M.get_preset(config.model.preset, vocab_size=vocab_size)
    params = M.init_params(model_config, jax.random.key(seed))
    params["unembed"]["kernel"] = params["unembed"]["kernel"] * 20.0
    manager = ckpt.make_manager(workdir, async_save=False)
    record = to_dict(config) | {"model_config": dataclasses.asdict(model_config)}
    ckpt.save(manager, 0, {"step": np.int32(0), "params": params}, {"next_index": 0}, record)
    manager.close()
    return f"checkpoint:{workdir}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "a": _checkpoint(root / "a", 0),
        "b": _checkpoint(root / "b", 1),
        "wide": _checkpoint(root / "wide", 2, vocab_size=640),
    }


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(PROMPTS.read_text().splitlines(keepends=True)[:3]))
    return path


def _main(capsys, *argv):
    try:
        cli.main([str(a) for a in argv])
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def _generate(capsys, prompts, out, *flags):
    return _main(capsys, "generate", "--prompts", prompts, "--out", out, *flags)


def _lines(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _config(name):
    return ROOT / f"configs/generate/{name}.py"


def test_guided_configs_reduce_to_one_model_and_flags_override(runs, prompts, tmp_path, capsys):
    """EFT with large_base = small_base = a and alpha 1 is model b; nudging with gamma 0 is its
    base a; GenARM with weight 0 is its base a: each writes model b's or a's own greedy
    completions. --max_new_tokens 5 overrides the configs' 8."""
    alone = {}
    for name in ("a", "b"):
        alone[name] = tmp_path / f"{name}.jsonl"
        flags = ("--model", runs[name], "--max_new_tokens", 5, "--temperature", 0)
        assert _generate(capsys, prompts, alone[name], *flags)[0] == 0
    cases = {
        "eft": ("b", ["models.large_base", "models.small_base"], ["models.small_tuned"], []),
        "nudging": ("a", ["models.base"], ["models.aligned"], ["gamma=0.0"]),
        "genarm": ("a", ["models.base"], [], ["weights=(0.0,)", f"models.arms=('{runs['b']}',)"]),
    }
    for method, (same_as, as_a, as_b, extra) in cases.items():
        out = tmp_path / f"{method}.jsonl"
        overrides = [f"{k}={runs['a']}" for k in as_a] + [f"{k}={runs['b']}" for k in as_b]
        flags = [f"--config.{x}" for x in overrides + extra]
        status, err = _generate(
            capsys, prompts, out, "--config", _config(method), "--max_new_tokens", 5, *flags
        )
        assert status == 0, err
        got, want = _lines(out), _lines(alone[same_as])
        assert [x["method"] for x in got] == [method] * 3
        assert [x["completion"] for x in got] == [x["completion"] for x in want]
        assert [x["num_tokens"] for x in got] == [x["num_tokens"] for x in want]
        assert max(x["num_tokens"] for x in got) == 5
        np.testing.assert_allclose(
            [x["logprob"] for x in got], [x["logprob"] for x in want], atol=1e-4, rtol=0
        )


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--config.method=eftt"],
            "unknown guided method 'eftt' (known: eft, genarm, nudging, search)",
        ),
        (["--config.models.small_base="], "method eft needs models.small_base (checkpoint:"),
        (["--config.models.large=x"], 'unknown key "models.large"'),
        (["--config.models.small_tuned=WIDE"], "vocabulary sizes differ (large_base ("),
        (
            ["--model", "A"],
            "--model, --best_of, --reward, --reward_model and --worst go without --config",
        ),
        (
            ["--config.sampling.top_q=1"],
            'unknown key "sampling.top_q" (did you mean "sampling.top_',
        ),
        (["--config.sampling.top_p=0"], "sampling option top_p=0: expected in (0, 1]"),
        (["--config.alpha=1e999"], "alpha=inf: expected a finite number"),
    ],
)
def test_bad_guided_configs_exit_2_naming_them(runs, prompts, tmp_path, capsys, flags, message):
    out = tmp_path / "x.jsonl"
    models = [f"--config.models.{r}={runs['a']}" for r in ("large_base", "small_base")]
    models.append(f"--config.models.small_tuned={runs['b']}")
    flags = [f.replace("WIDE", runs["wide"]).replace("A", runs["a"]) for f in flags]
    status, err = _generate(capsys, prompts, out, "--config", _config("eft"), *models, *flags)
    assert status == 2 and err.startswith("jaxalign: ") and message in err, err
    assert err.count("\n") == 1 and not out.exists()


def test_unknown_key_in_a_config_file_and_overrides_without_config(runs, prompts, tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from jaxalign.sampling.cli_generate import guided_config\n\n"
        "def get_config(arg=None):\n"
        "    c = guided_config()\n"
        "    c.method = 'nudging'\n"
        "    c.gama = 0.5\n"
        "    return c\n"
    )
    status, err = _generate(capsys, prompts, tmp_path / "x.jsonl", "--config", bad)
    assert status == 2 and f'{bad}: unknown key "gama" (did you mean "gamma"?)' in err, err
    status, err = _generate(
        capsys, prompts, tmp_path / "x.jsonl", "--model", runs["a"], "--config.alpha=2"
    )
    assert status == 2 and "--config.KEY overrides go with --config" in err, err
