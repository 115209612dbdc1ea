"""Training end to end on the tiny model: smoke runs, exact resume, preemption, NaN stop,
gradient accumulation, CLI errors."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxalign import models
from jaxalign.checkpoint import manager as ckpt
from jaxalign.config import apply_overrides, load_config
from jaxalign.errors import TrainingError
from jaxalign.train import setup, train

ROOT = pathlib.Path(__file__).resolve().parents[2]
SFT = str(ROOT / "configs/sft/tiny.py")
DPO = str(ROOT / "configs/dpo/tiny.py")


def _config(path, *overrides, arg="smoke=True"):
    config = load_config(f"{path}:{arg}")
    return apply_overrides(config, list(overrides))


def _records(workdir, split="train"):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _latest_params(workdir, model_config):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        models.abstract_params(model_config),
    )
    return ckpt.load_params(workdir, abstract)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft")
    result = train(_config(SFT), workdir)
    return workdir, result


def test_sft_smoke_writes_metrics_checkpoints_and_tensorboard(sft_run):
    workdir, result = sft_run
    train_records = _records(workdir)
    assert [r["step"] for r in train_records] == [2, 4]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_records)
    assert {"grad_norm", "learning_rate"} <= set(train_records[-1])
    assert result["eval"]["loss"] < _records(workdir, "eval")[0]["loss"]  # learned something
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "4",
    ]
    assert any((workdir / "tensorboard").iterdir())


def test_eval_command_matches_the_runs_final_eval(sft_run):
    workdir, result = sft_run
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxalign.cli",
            "eval",  # the run's own recorded config: no --config
            "--workdir",
            str(workdir),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    printed = dict(line.split(": ") for line in out.stdout.strip().splitlines())
    assert float(printed["loss"]) == pytest.approx(result["eval"]["loss"], rel=1e-5)


def test_reading_a_mistyped_run_directory_raises_and_creates_nothing(tmp_path):
    from jaxalign.checkpoint.convert import read_model_config
    from jaxalign.errors import CheckpointError

    typo = tmp_path / "no-such-run"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_model_config(typo)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _latest_params(typo, models.get_preset("tiny-64"))
    assert not typo.exists()


def test_dpo_smoke_from_the_sft_checkpoint(sft_run, tmp_path):
    sft_dir, _ = sft_run
    config = _config(DPO, f"model.init_from=checkpoint:{sft_dir}")
    result = train(config, tmp_path)
    first_eval = _records(tmp_path, "eval")[0]
    # The reference is the initial policy: at step 0 every implicit reward is exactly 0.
    assert first_eval["rewards/margin"] == 0.0 and first_eval["loss"] == pytest.approx(np.log(2))
    assert {"rewards/accuracy", "rewards/margin", "rewards/chosen", "logps/accuracy"} <= set(
        result["train"]
    )
    assert np.isfinite(result["train"]["loss"])


def test_reference_free_loss_runs_no_reference(sft_run, tmp_path):
    sft_dir, _ = sft_run
    config = _config(DPO, f"model.init_from=checkpoint:{sft_dir}")
    with config.unlocked():
        config.loss = {"name": "simpo", "beta": 2.0}
    run = setup(config)
    assert not run.needs_ref
    result = train(config, tmp_path)
    assert np.isfinite(result["train"]["loss"])


def _run_cli(workdir, *extra, wait=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "-m", "jaxalign.cli", "train", "--config", f"{SFT}:smoke=True"]
    cmd += ["--workdir", str(workdir), *extra]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if wait:
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err
    return proc


def _wait_for_checkpoint(proc, workdir, step, timeout=240):
    target = pathlib.Path(workdir) / "checkpoints" / str(step)
    deadline = time.time() + timeout
    while not target.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


RESUME_STEPS = ["--config.steps=8", "--config.checkpoint.every=2", "--config.log_every=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    rc, _, err = _run_cli(workdir, *RESUME_STEPS)
    assert rc == 0, err[-3000:]
    return workdir


def _tensorboard_steps(workdir) -> dict[str, list[int]]:
    """{tag: steps} of the scalars TensorBoard would show: events read in order from every event
    file, a SessionLog START at step s discarding the earlier events at steps >= s (purge)."""
    import struct

    from tensorboardX.proto import event_pb2

    seen: dict[str, list[int]] = {}
    for path in sorted((pathlib.Path(workdir) / "tensorboard").iterdir()):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + n])
            at += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                seen = {t: [s for s in v if s < event.step] for t, v in seen.items()}
            for value in event.summary.value:
                seen.setdefault(value.tag, []).append(event.step)
    return seen


@pytest.mark.parametrize(
    "how",
    [
        "sigkill",
        # The signal-save path (Preemption) is slow-only; the resume itself is SIGKILL's.
        pytest.param("sigterm", marks=pytest.mark.slow),
        pytest.param("sigint", marks=pytest.mark.slow),
    ],
)
def test_interrupted_run_resumes_exactly(uninterrupted, tmp_path, how):
    proc = _run_cli(tmp_path, *RESUME_STEPS, wait=False)
    _wait_for_checkpoint(proc, tmp_path, 2)
    proc.send_signal({"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM}.get(how, signal.SIGINT))
    _, err = proc.communicate(timeout=120)
    if how != "sigkill":  # saved and stopped with 128 + the signal, no traceback
        assert proc.returncode == (143 if how == "sigterm" else 130), err[-3000:]
        assert f"{how.upper()} received; checkpoint saved" in err and "Traceback" not in err
    stopped_at = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert stopped_at < 8, "the run finished before it was interrupted"

    rc, _, err = _run_cli(tmp_path, *RESUME_STEPS)
    assert rc == 0, err[-3000:]
    assert f"resuming from step {stopped_at} of 8" in err
    # The steps logged after the checkpoint by the interrupted run are not logged twice.
    steps = [(r["split"], r["step"]) for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]
    assert steps == [
        (r["split"], r["step"]) for r in map(json.loads, open(uninterrupted / "metrics.jsonl"))
    ]
    assert _tensorboard_steps(tmp_path) == _tensorboard_steps(uninterrupted)
    model_config = models.get_preset("tiny-64")
    expected = _latest_params(uninterrupted, model_config)
    got = _latest_params(tmp_path, model_config)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    last = {r["step"]: r for r in _records(tmp_path)}[8]
    reference = {r["step"]: r for r in _records(uninterrupted)}[8]
    assert last["loss"] == reference["loss"]
    assert last["grad_norm"] == reference["grad_norm"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = _config(
        SFT,
        "optimizer.lr=1e38",
        "optimizer.clip_norm=0.0",
        "log_every=1",
        "checkpoint.every=1",
        "steps=20",
    )
    with pytest.raises(TrainingError, match=r"step \d+: .* is not finite; stopped\. Last good"):
        train(config, tmp_path)
    steps_saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    params = _latest_params(tmp_path, models.get_preset("tiny-64"))
    assert steps_saved and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_cli_unknown_config_key_names_it(tmp_path):
    rc, _, err = _run_cli(tmp_path, "--config.optimizer.learning_rate=1e-3")
    assert rc == 2
    assert 'unknown key "optimizer.learning_rate" (did you mean "optimizer.lr"?)' in err


def test_unknown_loss_hyperparameter_is_a_config_error(tmp_path):
    rc, _, err = _run_cli(tmp_path, "--config.trainer=dpo", "--config.loss.betta=1")
    assert rc == 2 and 'unknown key "loss.betta"' in err
