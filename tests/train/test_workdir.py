"""One run per workdir: the recorded config, refusing a different one, the lock, resuming and
finished runs, the end-of-run summary, eval with the run's own settings, Ctrl-C twice, skipping
non-finite updates, truncation counts."""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import cli
from jaxalign.config import apply_overrides, load_config
from jaxalign.errors import ConfigError, TrainingError
from jaxalign.train import init_params, setup, steps, train
from jaxalign.train import workdir as workdirs
from jaxalign.train.run import check_finite

ROOT = pathlib.Path(__file__).resolve().parents[2]
SFT = str(ROOT / "configs/sft/tiny.py")
DPO = str(ROOT / "configs/dpo/tiny.py")
TOKENIZER = f"tokenizer={ROOT / 'data/demo/tokenizer.model'}"


def _config(path, *overrides):
    return apply_overrides(load_config(f"{path}:smoke=True"), [TOKENIZER, *overrides])


def _steps(workdir):
    return [(r["split"], r["step"]) for r in map(json.loads, open(workdir / "metrics.jsonl"))]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft")
    train(_config(SFT), workdir)
    return workdir


def test_the_config_is_recorded_and_a_different_one_refused(sft_dir, tmp_path):
    recorded = json.loads((sft_dir / "config.json").read_text())
    assert recorded["trainer"] == "sft" and recorded["steps"] == 4
    before = (sft_dir / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as error:
        train(_config(SFT, "optimizer.lr=0.5", "data.max_len=96"), sft_dir)
    message = str(error.value)
    assert "data.max_len: 48 -> 96" in message and "optimizer.lr: " in message
    assert "--allow_config_change" in message
    assert (sft_dir / "metrics.jsonl").read_text() == before  # nothing appended


def test_a_finished_run_says_so_and_appends_nothing(sft_dir, capsys):
    before = (sft_dir / "metrics.jsonl").read_text()
    summary = train(_config(SFT), sft_dir)
    assert f"{sft_dir} already finished at step 4" in capsys.readouterr().err
    assert summary == json.loads((sft_dir / "summary.json").read_text())
    assert (sft_dir / "metrics.jsonl").read_text() == before


@pytest.mark.slow  # fast siblings: the refusal and finished-run tests of this file
def test_longer_runs_resume_and_accepted_changes_are_recorded(sft_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    train(_config(SFT), workdir)
    assert "summary: sft steps 0 -> 4 in" in capsys.readouterr().err
    summary = train(_config(SFT, "steps=6"), workdir)  # run length may change
    err = capsys.readouterr().err
    assert "resuming from step 4 of 6" in err and summary["steps"] == [4, 6]
    assert _steps(workdir).count(("train", 4)) == 1 and ("train", 6) in _steps(workdir)
    train(_config(SFT, "steps=8", "optimizer.lr=0.002"), workdir, allow_config_change=True)
    assert "config changed since the last start: optimizer.lr, steps" in capsys.readouterr().err
    assert json.loads((workdir / "config.json").read_text())["optimizer"]["lr"] == 0.002


def test_the_summary_is_printed_and_written(sft_dir):
    summary = json.loads((sft_dir / "summary.json").read_text())
    assert summary["steps"] == [0, 4] and summary["stopped_by"] == ""
    assert summary["checkpoint"] == str(sft_dir.absolute() / "checkpoints" / "4")
    assert summary["tokens_per_s"] > 0 and summary["wall_time_s"] > 0
    assert summary["train"]["loss"] > 0 and summary["eval"]["loss"] > 0
    assert workdirs.read_summary(sft_dir) == summary


def test_a_second_concurrent_run_is_refused(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxalign.cli", "train", "--config", f"{SFT}:smoke=True"]
    cmd += ["--workdir", str(workdir), f"--config.{TOKENIZER}", "--config.steps=200"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (workdir / "checkpoints").exists():  # the first run holds the lock by now
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert second.returncode == 2
        assert f"workdir {workdir}: another run is using it (pid {first.pid})" in second.stderr
    finally:
        first.kill()
        first.communicate()


def test_a_second_ctrl_c_aborts_at_once():
    """The first Ctrl-C asks the loop to stop (save and exit); a second ends the process at
    once with 130, whatever it is doing (here: sleeping where a long step would run)."""
    script = (
        "import os, signal, time\n"
        "from jaxalign.train.run import Preemption\n"
        "with Preemption() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.5)\n"
        "    print('first:', stop.name, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "    print('not reached', flush=True)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 130 and proc.stdout == "first: SIGINT\n"
    assert "jaxalign: interrupted" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_uses_the_runs_own_settings(sft_dir, tmp_path, capsys):
    """A DPO run with its own beta and reference source: `jaxalign eval --workdir` alone
    reproduces its final evaluation; an override is applied and named."""
    workdir = tmp_path / "dpo"
    start = f"model.init_from=checkpoint:{sft_dir}"
    result = train(_config(DPO, start, "loss.beta=0.3", "steps=3"), workdir)
    capsys.readouterr()
    cli.main(["eval", "--workdir", str(workdir)])
    out = capsys.readouterr()
    printed = dict(line.split(": ") for line in out.out.strip().splitlines())
    assert float(printed["rewards/margin"]) == pytest.approx(
        result["eval"]["rewards/margin"], rel=1e-5
    )
    assert float(printed["loss"]) == pytest.approx(result["eval"]["loss"], rel=1e-5)
    cli.main(["eval", "--workdir", str(workdir), "--config.loss.beta=0.1"])
    out = capsys.readouterr()
    assert "overriding the run's loss.beta" in out.err
    printed = dict(line.split(": ") for line in out.out.strip().splitlines())
    scaled = result["eval"]["rewards/margin"] / 3  # the margin is beta * (s_w - s_l)
    assert float(printed["rewards/margin"]) == pytest.approx(scaled, rel=1e-5)


def test_skip_nonfinite_skips_bad_updates_and_stops_past_its_limit():
    config = _config(SFT, "optimizer.skip_nonfinite=2", "optimizer.warmup_steps=0")
    run = setup(config, devices=jax.devices()[:1])
    params = jax.device_get(init_params(run))
    state = {"step": jnp.int32(0), "params": params, "opt_state": run.tx.init(params)}
    batch = next(run.batches(config.data.train, train=True))
    bad = dict(batch, loss_mask=np.where(batch["loss_mask"] > 0, np.nan, 0.0).astype(np.float32))
    step = jax.jit(steps.make_train_step(run.objective, run.tx, run.schedule))
    after_bad, metrics = step(state, None, run.global_batch([bad]))
    jax.tree.map(np.testing.assert_array_equal, after_bad["params"], params)  # not applied
    assert int(metrics["updates_skipped"]) == 1 and int(metrics["nonfinite_streak"]) == 1
    check_finite(metrics, 1, config, _NoManager(), "w")  # within the limit: goes on
    good, metrics = step(after_bad, None, run.global_batch([batch]))
    assert int(metrics["nonfinite_streak"]) == 0 and int(metrics["updates_skipped"]) == 1
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), good["params"], params)
    assert min(jax.tree.leaves(moved)) > 0  # the good update is applied
    with pytest.raises(TrainingError, match="3 consecutive non-finite gradients"):
        check_finite({"nonfinite_streak": 3}, 9, config, _NoManager(), "w")


class _NoManager:
    def wait_until_finished(self):
        pass

    def latest_step(self):
        return None


def test_truncated_examples_are_counted(tmp_path, capsys):
    summary = train(
        _config(SFT, "data.max_len=12", "data.max_prompt_len=8", "log_every=1"), tmp_path
    )
    err = capsys.readouterr().err
    assert "are truncated" in err and summary["truncated_examples"] > 0
    logged = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["split"] == "train"]
    assert logged[0]["data/truncated_examples"] > 0


def test_cli_output_carries_no_repeated_absl_warnings(sft_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(
        [sys.executable, "-m", "jaxalign.cli", "eval", "--workdir", str(sft_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "absl" not in out.stderr and "WARNING" not in out.stderr
