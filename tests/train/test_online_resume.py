"""An online run stopped mid-way and resumed ends bit-identical to one that was never stopped.

What a resume must restore is all in the checkpoint: the params (PPO's value head among them),
the optimizer state, the loop's own state (the adaptive KL controller, `rl.kl_target` > 0, and
PPO-max's running reward statistics, `rl.reward_scale`), and the prompt iterator's position; the
rollout key of step t is fold_in(key(seed), t), so nothing else is needed. PPO (two epochs of two
minibatches, whose shuffles are keyed by the step too) runs with both controllers on, GRPO with
reward scaling (its KL is a loss term at the fixed rl.kl_coef), from the tiny random init; the
reward is a tent around a completion length in characters, so it varies within groups and every
update moves the params.

Bit-identical: the resumed run is the same program on the same devices and inputs, so its
params and every logged number equal the uninterrupted run's exactly (assert_array_equal, ==),
save the wall-clock timings (time/rollout_s, time/update_s, rollout_tokens_per_s).

- fast (in process): a crash (an exception from the step-3 save, after step 3's metrics were
  logged) and a resume from checkpoint 2;
- slow (`jaxalign train` in a subprocess): SIGKILL and SIGTERM after checkpoint 2 of 6, then a
  resume from whatever checkpoint the signal left.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import models
from jaxalign.checkpoint import manager as ckpt
from jaxalign.config import apply_overrides, load_config
from jaxalign.models import heads
from jaxalign.train import setup, train

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMING = {"time/rollout_s", "time/update_s", "rollout_tokens_per_s"}
COMMON = [
    f"tokenizer={ROOT / 'data/demo/tokenizer.model'}",
    f"data.train={ROOT / 'data/demo/sft_train.jsonl'}",
    "data.eval=",
    "data.batch_size=4",
    "rl.group_size=4",
    "rl.max_new_tokens=6",
    "rl.rewards=(('length', 1.0, {'target': 12, 'scale': 12}),)",
    "rl.kl_coef=0.05",
    "rl.reward_scale=True",  # the running reward statistics are state
    "optimizer.lr=1e-3",
    "log_every=1",
    "checkpoint.every=2",
]
FAMILY = {
    "grpo": [],
    # The adaptive KL controller (its coefficient is state) shapes the KL in PPO's reward.
    "ppo": ["rl.minibatches=2", "rl.epochs=2", "rl.kl_target=0.5"],
}


def _overrides(family: str, steps: int) -> list[str]:
    return [*COMMON, *FAMILY[family], f"steps={steps}"]


def _config(family: str, steps: int):
    config = load_config(f"{ROOT / 'configs' / family / 'tiny.py'}:smoke=True")
    return apply_overrides(config, _overrides(family, steps))


def _lines(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]


def _saved_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _final_state(workdir, family):
    """The last checkpoint's params (with PPO's value head), on one device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    model_config = models.get_preset("tiny-64")
    abstract = models.abstract_params(model_config)
    if family == "ppo":
        abstract[heads.VALUE_HEAD] = heads.abstract_scalar_head(model_config)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
    )
    return jax.device_get(ckpt.load_params(workdir, abstract))


def _assert_same_run(got_dir, want_dir, family):
    got, want = _lines(got_dir), _lines(want_dir)
    assert [(r["split"], r["step"]) for r in got] == [(r["split"], r["step"]) for r in want]
    for a, b in zip(got, want, strict=True):
        assert sorted(a) == sorted(b)
        same = {k: v for k, v in b.items() if k not in TIMING}
        assert {k: a[k] for k in same} == same, f"step {b['step']}"
    jax.tree.map(
        np.testing.assert_array_equal, _final_state(got_dir, family), _final_state(want_dir, family)
    )


def _check_state_is_exercised(workdir, family):
    """Guards the comparison: PPO's KL coefficient moved (adaptive), rewards were scaled (the
    transformed reward differs from the raw one) and every step's reward varied."""
    train_lines = [r for r in _lines(workdir) if r["split"] == "train"]
    if family == "ppo":
        coefs = [r["kl_coef"] for r in train_lines]
        assert len(set(coefs)) == len(coefs), coefs
    assert all(r["reward/transformed"] != r["reward"] for r in train_lines)
    assert all(r["reward_std"] > 0 for r in train_lines)


class _Crash(Exception):
    pass


@pytest.mark.parametrize(
    "family",
    [pytest.param("grpo", marks=pytest.mark.slow), "ppo"],  # ppo holds every state
)
def test_a_crash_after_a_checkpoint_resumes_bit_identically(family, tmp_path, monkeypatch):
    steps = 3
    straight = tmp_path / "straight"
    train(_config(family, steps), straight)
    _check_state_is_exercised(straight, family)

    crashed = tmp_path / "crashed"
    save = ckpt.save

    def save_until_3(manager, step, *args, **kw):
        if step == 3:  # step 3's metrics are logged; the process dies before saving it
            raise _Crash
        return save(manager, step, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save", save_until_3)
        with pytest.raises(_Crash):
            train(_config(family, steps), crashed)
    assert [r["step"] for r in _lines(crashed)][-1] == 3
    assert _saved_steps(crashed) == [2]
    train(_config(family, steps), crashed)
    _assert_same_run(crashed, straight, family)


def test_the_learning_rate_follows_the_online_step_not_the_update():
    """An online step makes rl.epochs x rl.minibatches = 4 updates: all 4 take the learning rate
    of that step (cosine decay over `steps` steps, from the math), both the one the optimizer
    applies and the one logged. (Counting updates as steps decayed 4 times too fast.)"""
    steps, lr = 4, 1e-3
    config = _config("ppo", steps)
    with config.unlocked():
        config.optimizer.update(lr=lr, end_lr_ratio=0.0, weight_decay=0.0, clip_norm=0.0)
    run = setup(config)
    per_step = lr * 0.5 * (1 + np.cos(np.pi * np.arange(steps) / steps))
    want = np.repeat(per_step, 4)
    logged = np.array([float(run.schedule(count)) for count in range(4 * steps)])
    np.testing.assert_allclose(logged, want, rtol=1e-6)
    # Adam's step for a constant gradient 1 is lr / (1 + eps): the applied learning rate.
    params, grads = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    opt_state, applied = run.tx.init(params), []
    for _ in range(4 * steps):
        update, opt_state = run.tx.update(grads, opt_state, params)
        applied.append(-float(update["w"][0]) * (1 + config.optimizer.eps))
    np.testing.assert_allclose(applied, want, rtol=1e-5)


# The same through `jaxalign train` and real signals (slow: a process start and compile per run).

STEPS = 6


def _cli(family, workdir, *, wait=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "-m", "jaxalign.cli", "train"]
    cmd += ["--config", f"{ROOT / 'configs' / family / 'tiny.py'}:smoke=True"]
    cmd += ["--workdir", str(workdir), *(f"--config.{o}" for o in _overrides(family, STEPS))]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if not wait:
        return proc
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return {family: tmp_path_factory.mktemp(family) for family in FAMILY}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
@pytest.mark.parametrize("family", list(FAMILY))
def test_a_killed_run_resumes_bit_identically(family, how, uninterrupted, tmp_path):
    straight = uninterrupted[family]
    if not (straight / "summary.json").exists():
        _cli(family, straight)
        _check_state_is_exercised(straight, family)
    proc = _cli(family, tmp_path, wait=False)
    first = tmp_path / "checkpoints" / "2"
    deadline = time.time() + 400
    while not first.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if how == "sigterm":  # finishes its step, saves, exits with 128 + 15, no traceback
        assert proc.returncode == 143, err[-3000:]
        assert "SIGTERM received; checkpoint saved" in err and "Traceback" not in err
    stopped_at = _saved_steps(tmp_path)[-1]
    assert stopped_at < STEPS, "the run finished before it was interrupted"

    err = _cli(family, tmp_path)
    assert f"resuming from step {stopped_at} of {STEPS}" in err
    _assert_same_run(tmp_path, straight, family)
