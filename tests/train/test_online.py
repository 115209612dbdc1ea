"""Online RL end to end on the tiny model: every family moves its metric the right way, and the
failure modes peers shipped are pinned (the EOS trained, fresh keys per step, the sampler's
temperature in the old log-probs, untruncated ratio denominators, ratio 1 on the first update).

The families start from a short SFT run on the demo task (the model then answers with numbers);
their reward is "the answer starts with 1" (`format` reward, pattern "1.*"), which a few updates
can learn, so a short run shows the direction of each family's metric. Held-out accuracy on the
demo's arithmetic (the judge) takes longer runs: `test_online_demo.py` (slow) and the README.
"""

import json
import pathlib

import jax
import numpy as np
import pytest

from jaxalign.config import apply_overrides, load_config
from jaxalign.errors import ConfigError
from jaxalign.models import get_preset
from jaxalign.models.functional import DROPOUT_KEY
from jaxalign.train import init_params, policy, setup, train
from jaxalign.train import online as online_loop
from jaxalign.train.updates import initial_rl_state

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = f"tokenizer={ROOT / 'data/demo/tokenizer.model'}"
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


def _config(family, sft_dir, *overrides):
    config = load_config(f"{ROOT / 'configs' / family / 'tiny.py'}")
    return apply_overrides(
        config,
        [
            TOKENIZER,
            f"data.train={ROOT / 'data/demo/sft_train.jsonl'}",
            "data.eval=",
            f"model.init_from=checkpoint:{sft_dir}",
            "data.batch_size=8",
            "rl.group_size=4",
            "rl.max_new_tokens=4",
            "log_every=1",
            "checkpoint.every=1000",
            "optimizer.lr=5e-4",
            STARTS_WITH_ONE,
            *overrides,
        ],
    )


def _train_records(workdir):
    return [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if r["split"] == "train"]


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("grpo", ()),
        # PPO's fast tests: test_online_mesh.py, test_online_resume.py
        pytest.param("ppo", ("rl.minibatches=2",), marks=pytest.mark.slow),
        pytest.param("rloo", (), marks=pytest.mark.slow),  # fast: tests/rl rloo_advantages
        pytest.param("reinforce_pp", (), marks=pytest.mark.slow),  # fast: test_online_errors
        ("online_dpo", ("rl.group_size=2",)),
        ("rft", ("rl.rft_min_reward=1.0",)),
    ],
)
def test_each_family_raises_its_reward(family, overrides, sft_dir, tmp_path):
    steps = 16
    summary = train(_config(family, sft_dir, f"steps={steps}", *overrides), tmp_path)
    records = _train_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    first = np.mean([r["reward"] for r in records[:4]])
    last = np.mean([r["reward"] for r in records[-4:]])
    assert last > first + 0.15, (family, first, last)
    assert np.isfinite(summary["train"]["loss"])


@pytest.mark.slow  # the control run (held-out evals before and after: ~40 s)
def test_a_random_reward_does_not_raise_held_out_accuracy(sft_dir, tmp_path, monkeypatch):
    """The control run: GRPO rewarded by coin flips (a deterministic hash of prompt and
    completion) does not clearly raise the judge's held-out accuracy of the SFT start, greedy or
    sampled (8 samples per prompt): the paired difference over the 200 held-out prompts stays
    below 3 standard errors, the README's bar for "clearly"; the judge is logged at weight 0 and
    its training reward does not rise either."""
    (tmp_path / "coin_flips.py").write_text(
        "import zlib\n\n"
        "def coin():\n"
        "    def reward(record, completion):\n"
        "        return float(zlib.crc32((record['prompt'] + completion).encode()) % 2)\n"
        "    return reward\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = "rl.rewards=(('coin_flips:coin', 1.0), ('demo_judge', 0.0))"
    held_out = f"data.eval={ROOT / 'data/demo/prompts_eval.jsonl'}"
    config = _config("grpo", sft_dir, "steps=16", rewards, held_out, "rl.eval_samples=8")
    train(config, tmp_path / "run")
    records = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    before, after = (r for r in records if r["split"] == "eval")
    assert before["step"] == 0 and after["step"] == 16
    start, end = (json.loads((tmp_path / f"run/eval/step_{t}.json").read_text()) for t in (0, 16))
    # The judge's accuracy (weight 0: "reward/..." is the coin's).
    for metric in ("rewards/demo_judge/greedy", "rewards/demo_judge/sampled"):
        assert len(start[metric]) == len(end[metric]) == 200
        diff, se = online_loop.paired_difference(start[metric], end[metric])
        assert diff == pytest.approx(after[metric] - before[metric], abs=1e-9)
        assert diff < 3 * se, (metric, before[metric], after[metric], diff, se)
    train_records = [r for r in records if r["split"] == "train"]
    first = np.mean([r["rewards/demo_judge"] for r in train_records[:4]])
    last = np.mean([r["rewards/demo_judge"] for r in train_records[-4:]])
    assert last <= first + 0.05, (first, last)


def test_held_out_sampled_accuracy_averages_eval_samples_per_prompt(sft_dir, tmp_path):
    """`rl.eval_samples` completions per held-out prompt: its sampled score is their mean reward
    (a multiple of 1/n, between 0 and 1 for some prompt), greedy answers are one each, the metric
    is the mean over prompts, and the per-prompt scores are written to WORKDIR/eval/step_N.json
    in prompt order."""
    held_out = f"data.eval={ROOT / 'data/demo/prompts_eval.jsonl'}"
    run = setup(_config("grpo", sft_dir, held_out, "eval_batches=1", "rl.eval_samples=4"))
    evaluate = online_loop.make_evaluator(run, online_loop.Scorer(run), tmp_path)
    metrics = evaluate(init_params(run), 7)
    scores = json.loads((tmp_path / "eval/step_7.json").read_text())
    greedy, sampled = np.array(scores["reward/greedy"]), np.array(scores["reward/sampled"])
    assert greedy.shape == sampled.shape == (8,)  # eval_batches=1 batch of data.batch_size
    np.testing.assert_array_equal(scores["rewards/format/sampled"], sampled)  # the only reward
    np.testing.assert_array_equal(sampled * 4, np.round(sampled * 4))
    assert ((sampled > 0) & (sampled < 1)).any()
    assert set(greedy.tolist()) <= {0.0, 1.0}
    assert metrics["reward/sampled"] == pytest.approx(sampled.mean(), abs=1e-12)
    assert metrics["reward/greedy"] == pytest.approx(greedy.mean(), abs=1e-12)
    bad = _config("grpo", sft_dir, held_out, "rl.eval_samples=0")
    with pytest.raises(ConfigError, match="rl.eval_samples=0"):
        online_loop.make_evaluator(setup(bad), online_loop.Scorer(run), tmp_path)


def test_paired_difference_against_numpy():
    """Mean and standard error (ddof 1) of per-prompt differences, from the formula in float64."""
    rng = np.random.default_rng(0)
    before, after = rng.integers(0, 2, 200).astype(float), rng.random(200)
    d = [b - a for a, b in zip(before.tolist(), after.tolist(), strict=True)]
    mean = sum(d) / len(d)
    se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
    got = online_loop.paired_difference(before, after)
    assert got == pytest.approx((mean, se), rel=1e-12, abs=0)


def _state(run):
    """A fresh train state and its reference, as a run starts."""
    params = init_params(run)
    state = {"step": np.int32(0), "params": params, "opt_state": run.tx.init(params)}
    return state, jax.tree.map(np.copy, params)


def _rl(run):
    return {"rl": initial_rl_state(run.config)}


def _rollout(run, params, *, key):
    prompts = next(run.batches(run.config.data.train, train=True))
    scorer = online_loop.Scorer(run)
    options = online_loop.sampling_options(run)
    rows, _, result = online_loop._rollout(run, params, prompts, key, options, scorer, 0)
    return rows, result


def test_the_old_log_probs_are_the_samplers_and_the_first_ratio_is_one(sft_dir):
    """Old log-probs come from the training kernels at the sampling temperature; they equal the
    sampler's own (top-p truncation is not in either: the ratio's denominator is the untruncated
    distribution) and the first update's ratio is 1. Two minibatches per rollout, so the old
    log-probs get a forward of their own before the first update."""
    config = _config(
        "grpo", sft_dir, "rl.temperature=0.7", "rl.top_p=0.5", "rl.kl_coef=0.04", "rl.minibatches=2"
    )
    run = setup(config)
    state, ref = _state(run)
    rows, _ = _rollout(run, state["params"], key=jax.random.key(3))
    batch, _, _ = run.family.to_batch(run)(state | _rl(run), ref, rows)
    mask = np.asarray(batch["loss_mask"]) > 0
    old, sampler = np.asarray(batch["old_logps"]), np.asarray(batch["sampler_logps"])
    np.testing.assert_allclose(old[mask], sampler[mask], atol=1e-5, rtol=0)
    # At temperature 1 (the mistake) the trainer's log-probs differ from the sampler's by far more.
    plain = policy.rollout_logps(run.model_config, state["params"], rows, temperature=1.0)
    assert np.abs(np.asarray(plain)[mask] - sampler[mask]).mean() > 1e-2
    _, update = run.jit_train_step()(state, ref, jax.tree.map(lambda x: x[None], batch))
    assert abs(float(update["ratio"]) - 1.0) < 1e-6
    assert float(update["clip_ratio/low"]) == 0.0 and float(update["clip_ratio/high"]) == 0.0
    assert float(update["sampler_logprob_diff"]) < 1e-5


def test_one_update_per_rollout_takes_the_old_log_probs_from_its_own_forward(sft_dir, monkeypatch):
    """With one update per rollout the batch carries no old log-probs: the update's own forward
    gives them (stop-gradient), the ratio is exactly 1, and the update equals the one made with
    old log-probs computed before it (two-minibatch config, the whole batch as one minibatch).
    Both updates run the full forward (the shared-prompt one, which only the first config would
    take, has its own test), so the comparison is of the old log-probs alone."""
    monkeypatch.setattr(policy, "shared_prompt", lambda *args: False)
    over = ("rl.temperature=0.7", "rl.kl_coef=0.04")
    runs = [setup(_config("grpo", sft_dir, *over, *extra)) for extra in ((), ("rl.minibatches=2",))]
    state, ref = _state(runs[0])
    rows, _ = _rollout(runs[0], state["params"], key=jax.random.key(5))
    got = []
    for run in runs:
        batch, _, _ = run.family.to_batch(run)(state | _rl(run), ref, rows)
        fresh = jax.tree.map(np.copy, state)
        new, update = run.jit_train_step()(fresh, ref, jax.tree.map(lambda x: x[None], batch))
        got.append((batch, new, update))
    (own, new_own, update_own), (sep, new_sep, update_sep) = got
    assert "old_logps" not in own and "old_logps" in sep
    assert float(update_own["ratio"]) == 1.0
    assert float(update_own["sampler_logprob_diff"]) < 1e-5
    for key in ("loss", "kl", "entropy", "sampler_logprob_diff"):
        np.testing.assert_allclose(
            update_own[key], update_sep[key], rtol=1e-5, atol=1e-6, err_msg=key
        )
    own_leaves, sep_leaves = jax.tree.leaves(new_own["params"]), jax.tree.leaves(new_sep["params"])
    leaves = zip(own_leaves, sep_leaves, strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_a_groups_prompt_runs_once_with_the_same_update(sft_dir, monkeypatch):
    """The rollout's rows in order (one pass, one minibatch): the reference's and the update's
    forwards run each prompt once for its group of samples (`policy.shared_prompt`). The
    reference log-probs, the update's metrics and its gradient equal the full forward's."""
    run = setup(_config("grpo", sft_dir, "rl.temperature=0.7", "rl.kl_coef=0.04"))
    state, ref = _state(run)
    ref = jax.tree.map(lambda x: 0.9 * x, ref)  # a reference apart from the policy: KL > 0
    rows, _ = _rollout(run, state["params"], key=jax.random.key(7))
    R, T = rows["tokens"].shape
    assert policy.shared_prompt(run.model_config, ref, (R, T), T - 4, 4, None)

    def forward_and_update():
        batch, _, _ = run.family.to_batch(run)(state | _rl(run), ref, rows)

        def loss(params):
            total, weight, sums = run.objective.fn(params, ref, batch)
            return total / weight, {k: v / weight for k, v in sums.items()}

        (_, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state["params"])
        return batch["ref_logps"], metrics, grads

    ref_grouped, metrics_grouped, grads_grouped = forward_and_update()
    monkeypatch.setattr(policy, "shared_prompt", lambda *args: False)
    ref_full, metrics_full, grads_full = forward_and_update()
    # Log-probs near 0 carry the float32 error of logits of magnitude ~16 (one ulp 1.9e-6).
    np.testing.assert_allclose(ref_grouped, ref_full, rtol=0, atol=4e-6)
    for key in ("kl", "entropy"):
        np.testing.assert_allclose(metrics_grouped[key], metrics_full[key], rtol=1e-5, err_msg=key)
    # float32 rounding of the two forwards: measured 1.0e-6 of the largest gradient entry.
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(grads_full))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale),
        grads_grouped,
        grads_full,
    )


def test_the_shared_prompt_rule(monkeypatch):
    """Groups of two or more dividing the rows, a prompt to share, no adapter dropout, and an
    attention that runs the XLA path (a TPU's splash kernel at T = 256 keeps the full forward;
    at T = 191, where splash cannot run, the XLA path shares)."""
    config, params = get_preset("tiny-64"), {"embed": {}}
    assert policy.shared_prompt(config, params, (32, 191), 63, 4, None)
    assert not policy.shared_prompt(config, params, (32, 191), 63, 1, None)
    assert not policy.shared_prompt(config, params, (30, 191), 63, 4, None)
    assert not policy.shared_prompt(config, params, (32, 191), 0, 4, None)
    assert not policy.shared_prompt(config, {DROPOUT_KEY: 0}, (32, 191), 63, 4, None)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert not policy.shared_prompt(config, params, (32, 256), 128, 4, None)
    assert policy.shared_prompt(config, params, (32, 191), 63, 4, None)


def test_the_update_reads_only_the_completion_columns(sft_dir):
    """The vocabulary matmuls run on the last rl.max_new_tokens target columns only (where a
    rollout's completions are): the log-probs equal those over every column."""
    run = setup(_config("grpo", sft_dir, "rl.temperature=0.7"))
    state, _ = _state(run)
    rows, _ = _rollout(run, state["params"], key=jax.random.key(1))
    kw = dict(temperature=0.7)
    every = policy.rollout_logps(run.model_config, state["params"], rows, **kw)
    last = policy.rollout_logps(run.model_config, state["params"], rows, columns=4, **kw)
    assert rows["tokens"].shape[1] > 4 and np.asarray(every)[:, :-4].any() == 0
    # A log-prob is z_y - logsumexp(z): near 0 its float32 error is that of logits of magnitude
    # ~16, one ulp = 1.9e-6; the two vocabulary matmuls (608 vs 128 rows) may round differently.
    np.testing.assert_allclose(last, every, rtol=0, atol=4e-6)


def test_each_step_samples_with_a_fresh_key(sft_dir):
    run = setup(_config("grpo", sft_dir))
    params = init_params(run)
    step = [jax.random.fold_in(jax.random.key(0), t) for t in (0, 1, 0)]
    (a, _), (b, _), (c, _) = (_rollout(run, params, key=k) for k in step)
    assert not np.array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["tokens"], c["tokens"])  # resumption samples the same


def test_the_eos_that_ends_a_completion_is_trained(sft_dir):
    """The loss mask ends with the EOS that stopped a completion, and the update moves its
    log-prob: rewarding the completions that stopped raises P(EOS) where they stopped."""
    run = setup(_config("grpo", sft_dir, "rl.kl_coef=0.0"))
    state, ref = _state(run)
    rows, result = _rollout(run, state["params"], key=jax.random.key(0))
    stopped = np.nonzero(result.finish_reason == "stop")[0]
    assert len(stopped) and len(stopped) < len(result.finish_reason)
    last = np.array([np.nonzero(rows["loss_mask"][r] > 0)[0][-1] for r in stopped])
    assert (rows["targets"][stopped, last] == run.tokenizer.eos_id).all()
    rewarded = rows | {"rewards": (result.finish_reason == "stop").astype(np.float32)}
    to_batch = run.family.to_batch(run)

    def eos_logps(params):
        logps = policy.rollout_logps(run.model_config, params, rows, temperature=1.0)
        return np.asarray(logps)[stopped, last]

    batch, _, _ = to_batch(state | _rl(run), ref, rewarded)
    before_eos = eos_logps(state["params"])
    new_state, _ = run.jit_train_step()(state, ref, jax.tree.map(lambda x: x[None], batch))
    after_eos = eos_logps(new_state["params"])
    assert (after_eos > before_eos).mean() > 0.8
