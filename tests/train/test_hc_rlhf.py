"""HC-RLHF end to end on the tiny model (`configs/hc_rlhf/tiny.py`).

- fast: the smoke config from the random init, 3 steps: the cost, multiplier and bound metrics,
  the multiplier's update rule and its place in the checkpoint, the safety test's file, summary
  and "no solution" line (tau 0.25 is out of reach of a random model); config mistakes as one
  `jaxalign: ...` line.
- slow: the demo. From a short SFT run, rewarded for answers that start with "1" and charged a
  cost of 1 for answers of 3 or more characters (the easy way to start with "1" is "1xx"):
  HC-RLHF lowers the held-out cost of the SFT start while the reward does not fall, the safety
  test passes at a reachable tau and returns "no solution" at tau = 0.
"""

import json
import pathlib
import types

import numpy as np
import pytest

from jaxalign import cli
from jaxalign.checkpoint import manager as ckpt
from jaxalign.config import apply_overrides, load_config
from jaxalign.train import init_params, setup, train
from jaxalign.train import online as online_loop
from jaxalign.train.run import checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = f"{ROOT / 'configs/hc_rlhf/tiny.py'}"
TOKENIZER = f"tokenizer={ROOT / 'data/demo/tokenizer.model'}"
DATA = [
    TOKENIZER,
    f"data.train={ROOT / 'data/demo/sft_train.jsonl'}",
    f"data.eval={ROOT / 'data/demo/prompts_eval.jsonl'}",
]


def _records(workdir, split):
    lines = map(json.loads, open(pathlib.Path(workdir) / "metrics.jsonl"))
    return [r for r in lines if r["split"] == split]


def test_the_smoke_config_trains_under_the_constraint_and_runs_the_safety_test(tmp_path, capsys):
    # No held-out evaluation (the demo's evaluations report the cost): the safety test's prompts.
    held_out = [f"rl.safety.prompts={ROOT / 'data/demo/prompts_eval.jsonl'}", "data.eval="]
    config = apply_overrides(load_config(f"{CONFIG}:smoke=True"), [*DATA, *held_out])
    summary = train(config, tmp_path)
    records = _records(tmp_path, "train")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records)
    # The multiplier starts at 0 and moves by projected ascent on the logged bound.
    lam, lr = 0.0, config.rl.safety.lambda_lr
    for r in records:
        assert 0.0 <= r["cost"] <= 1.0 and np.isfinite(r["bound"])
        assert r["lambda"] == pytest.approx(lam, abs=1e-6)
        lam = max(0.0, lam + lr * r["bound"])
    assert lam > 0  # the random model's completions are long: the bound is violated
    # The multiplier after the last step is loop state in the checkpoint.
    run = setup(config)
    with checkpoints(config, tmp_path) as manager:
        assert manager.latest_step() == 3
        state, _ = ckpt.restore(manager, run.abstract_target())
    assert float(state["rl"]["lambda"]) == pytest.approx(lam, abs=1e-6)
    safety = json.loads((tmp_path / "safety.json").read_text())
    assert set(safety) == {"passed", "ucb", "tau", "n", "delta", "cost", "reward"}
    assert safety["n"] == 4 and safety["tau"] == 0.25 and safety["delta"] == 0.1
    assert safety["passed"] is False and safety["ucb"] > safety["tau"]
    assert summary["safety"] == safety
    assert "no solution" in capsys.readouterr().err


def _cli_error(capsys, tmp_path, *overrides):
    argv = ["train", "--config", f"{CONFIG}:smoke=True", "--workdir", str(tmp_path / "run")]
    argv += [f"--config.{o}" for o in DATA] + [f"--config.{o}" for o in overrides]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("jaxalign: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert exit_info.value.code == 2
    assert not (tmp_path / "run/checkpoints").exists() or not any(
        (tmp_path / "run/checkpoints").iterdir()
    )
    return lines[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rl.costs=()"], "trainer hc_rlhf: no costs: set rl.costs"),
        (["trainer=rloo"], 'rl.costs / rl.cost_model: trainer "rloo" trains no cost constraint'),
        (["rl.costs=(('lenght', 1.0),)"], 'rl.costs: rewards[0]: unknown reward "lenght"'),
        (["rl.safety.delta=1.5"], "rl.safety.delta=1.5: expected 0 < delta < 1"),
        (["data.eval=", "rl.safety.prompts="], "the safety test needs held-out prompts"),
    ],
)
def test_config_mistakes(capsys, tmp_path, overrides, message):
    line = _cli_error(capsys, tmp_path, *overrides)
    assert message in line, line


def test_too_few_safety_prompts_are_refused_before_training(capsys, tmp_path):
    prompts = tmp_path / "safety.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a}+11?"}) + "\n" for a in (12, 13)))
    line = _cli_error(capsys, tmp_path, f"rl.safety.prompts={prompts}")
    assert f"rl.safety.n=4: {prompts} holds 2 prompts" in line, line


# --------------------------------------------------------------------------------------------------
# The demo (slow).

STARTS_WITH_ONE = "rl.rewards=(('format', 1.0, {'pattern': '1.*'}),)"


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft")
    config = apply_overrides(
        load_config(f"{ROOT / 'configs/sft/tiny.py'}"),
        [TOKENIZER, "steps=150", "data.eval=", "log_every=50", "checkpoint.every=150"],
    )
    with config.unlocked():
        config.data.train = str(ROOT / config.data.train)
    train(config, workdir)
    return workdir


def _demo_config(sft_dir, *overrides):
    return apply_overrides(
        load_config(CONFIG),
        [
            *DATA,
            f"model.init_from=checkpoint:{sft_dir}",
            "data.batch_size=8",
            "rl.group_size=4",
            "rl.max_new_tokens=4",
            "rl.eval_samples=4",
            "log_every=1",
            "eval_every=0",
            "checkpoint.every=1000",
            "optimizer.lr=5e-4",
            STARTS_WITH_ONE,
            *overrides,
        ],
    )


@pytest.mark.slow  # an SFT start and 24 constrained steps with held-out evaluations (minutes)
def test_hc_rlhf_lowers_the_held_out_cost_and_passes_a_reachable_safety_test(sft_dir, tmp_path):
    steps = 24
    summary = train(_demo_config(sft_dir, f"steps={steps}", "rl.safety.tau=0.25"), tmp_path)
    start, end = (json.loads((tmp_path / f"eval/step_{t}.json").read_text()) for t in (0, steps))
    evals = _records(tmp_path, "eval")
    assert all({"cost/greedy", "cost/sampled"} <= set(r) for r in evals)
    cost_diff, cost_se = online_loop.paired_difference(start["cost/sampled"], end["cost/sampled"])
    reward_diff, reward_se = online_loop.paired_difference(
        start["reward/sampled"], end["reward/sampled"]
    )
    print(
        f"held-out cost {np.mean(start['cost/sampled']):.3f} -> {np.mean(end['cost/sampled']):.3f}"
    )
    print(f"reward {np.mean(start['reward/sampled']):.3f} -> {np.mean(end['reward/sampled']):.3f}")
    print("safety", summary["safety"])
    print("train", [(r["cost"], r["lambda"], r["bound"]) for r in _records(tmp_path, "train")])
    assert cost_diff < -3 * cost_se, (cost_diff, cost_se)
    assert reward_diff > -cost_se, (reward_diff, reward_se)
    assert summary["safety"]["passed"], summary["safety"]
    # tau = 0 (the paper's default) is out of reach of this policy: "no solution".
    config = _demo_config(tmp_path, "rl.safety.tau=0.0")
    run = setup(config)
    params = init_params(run)
    unreachable = online_loop.safety_test(
        run,
        params,
        online_loop.safety_batches(run),
        online_loop.Scorer(run),
        online_loop.Scorer(run, costs=True),
        types.SimpleNamespace(print=print),
    )
    print("tau 0", unreachable)
    assert not unreachable["passed"] and unreachable["ucb"] > 0


class _Crash(Exception):
    pass


@pytest.mark.slow  # three smoke runs; the fast sibling checks the checkpointed multiplier
def test_a_crash_after_a_checkpoint_resumes_bit_identically(tmp_path, monkeypatch):
    """The multiplier is loop state: a run that dies after checkpoint 2 and resumes logs the
    same numbers (timings aside), ends with the same multiplier and the same safety test."""
    held_out = [f"rl.safety.prompts={ROOT / 'data/demo/prompts_eval.jsonl'}", "data.eval="]

    def config():
        return apply_overrides(load_config(f"{CONFIG}:smoke=True"), [*DATA, *held_out])

    train(config(), tmp_path / "straight")
    save = ckpt.save

    def save_until_3(manager, step, *args, **kw):
        if step == 3:  # step 3's metrics are logged; the process dies before saving it
            raise _Crash
        return save(manager, step, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save", save_until_3)
        with pytest.raises(_Crash):
            train(config(), tmp_path / "crashed")
    train(config(), tmp_path / "crashed")
    timing = {"time/rollout_s", "time/update_s", "rollout_tokens_per_s"}
    got, want = (_records(tmp_path / d, "train") for d in ("crashed", "straight"))
    assert [{k: v for k, v in r.items() if k not in timing} for r in got] == [
        {k: v for k, v in r.items() if k not in timing} for r in want
    ]
    assert len({r["lambda"] for r in want}) == 3  # the multiplier moved at every step
    safety = [
        json.loads((tmp_path / d / "safety.json").read_text()) for d in ("crashed", "straight")
    ]
    assert safety[0] == safety[1]
