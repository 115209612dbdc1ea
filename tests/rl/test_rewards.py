"""Rewards: rule rewards and their weighted, scheduled composition (and the errors a config or a
failing reward gives), running reward moments and scaling against NumPy, the DAPO overlong
penalty, InfAlign calibrate-and-transform, and the LSC re-export."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

import jaxalign.losses as L
from jaxalign.data.demo_task import generate_demo_records
from jaxalign.errors import ConfigError, DataError
from jaxalign.rl import rewards as R

# --------------------------------------------------------------------------------------------------
# Rule rewards.


def test_demo_judge_on_demo_records():
    records = generate_demo_records(
        0, sizes=dict(sft_train=0, pairs_train=0, pairs_eval=4, unpaired_train=0, prompts_eval=4)
    )
    for record in records["prompts_eval"]:
        assert R.demo_judge(record, record["answer"]) == 1.0
        assert R.demo_judge(record, f" {record['answer']}.") == 1.0
        assert R.demo_judge(record, str(int(record["answer"]) + 1)) == 0.0
        assert R.demo_judge(record, f"{record['answer']} or so") == 0.0


def test_format_reward_is_a_full_match_spanning_lines():
    fn = R.format_reward(r"<think>.*</think>\d+")
    assert fn({}, "<think>a\nb</think>42") == 1.0
    assert fn({}, "<think>a</think>42 extra") == 0.0  # a prefix match is not enough
    assert fn({}, "x<think>a</think>42") == 0.0
    with pytest.raises(ConfigError, match="not a regular expression"):
        R.format_reward("(unclosed")


def test_length_reward_formula():
    fn = R.length_reward(target=10, scale=4)
    for n in (0, 6, 8, 10, 11, 14, 30):
        assert fn({}, "x" * n) == pytest.approx(max(0.0, 1.0 - abs(n - 10) / 4))
    with pytest.raises(ConfigError, match="scale must be a number > 0"):
        R.length_reward(target=10, scale=0)


def test_exact_match():
    fn = R.exact_match("answer")
    assert fn({"answer": "42"}, "  42\n") == 1.0
    assert fn({"answer": 42}, "42") == 1.0
    assert fn({"answer": "42"}, "4 2") == 0.0
    other = R.exact_match(field="label")
    assert other({"label": "yes"}, "yes") == 1.0


# --------------------------------------------------------------------------------------------------
# Composition, schedules, config.


def test_linear_ramp():
    ramp = R.LinearRamp(0.0, 1.0, 10)
    assert [ramp(s) for s in (-3, 0, 5, 10, 50)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert R.LinearRamp(2.0, 3.0, 0)(0) == 3.0


def test_score_rule_rewards_matches_numpy():
    records = [{"prompt": "What is 12+30?", "answer": "42"}] * 3 + [
        {"prompt": "What is 50-8?", "answer": "42"}
    ]
    completions = ["42", "43", "<b>42</b>", "42."]
    specs = R.rewards_from_config(
        (
            ("demo_judge", 1.0),
            ("format", {"start": 0.0, "end": 0.4, "steps": 8}, {"pattern": r"\d+"}),
            ("length", 0.25, {"target": 2, "scale": 4}),
            ("exact_match", 2.0),
        )
    )
    assert [s.name for s in specs] == ["demo_judge", "format", "length", "exact_match"]
    judge = np.array([1.0, 0.0, 0.0, 1.0])
    fmt = np.array([1.0, 1.0, 0.0, 0.0])
    length = np.array([1 - abs(len(c) - 2) / 4 for c in completions]).clip(0)
    exact = np.array([1.0, 0.0, 0.0, 0.0])
    for step in (0, 2, 8, 100):
        total, per_fn = R.score_rule_rewards(specs, records, completions, step)
        w_fmt = 0.4 * min(step, 8) / 8
        want = judge + w_fmt * fmt + 0.25 * length + 2.0 * exact
        assert total.dtype == np.float32 and total.shape == (4,)
        np.testing.assert_allclose(total, want, rtol=1e-6)
        for name, values in zip(specs, (judge, fmt, length, exact), strict=True):
            np.testing.assert_allclose(per_fn[name.name], values, rtol=1e-6)  # unweighted


def test_rewards_from_config_reads_config_dicts_and_labels_repeats():
    c = ConfigDict(
        {"rewards": (("format", 1.0, {"pattern": "a"}), ("format", 0.5, {"pattern": "b"}))}
    )
    specs = R.rewards_from_config(c.rewards)
    assert [s.name for s in specs] == ["format#0", "format#1"]
    total, _ = R.score_rule_rewards(specs, [{}, {}], ["a", "b"], 0)
    np.testing.assert_allclose(total, [1.0, 0.5])


@pytest.mark.parametrize(
    "terms,match",
    [
        ((("format", 1.0, {"pattern": "("}),), "rewards\\[0\\]: format reward: pattern"),
        ((("demo_judg", 1.0),), 'unknown reward "demo_judg" \\(did you mean "demo_judge"\\?\\)'),
        (
            (("format", 1.0, {"patern": "x"}),),
            'no parameter "patern" \\(did you mean "pattern"\\?\\)',
        ),
        ((("format", 1.0),), "needs parameters \\['pattern'\\]"),
        ((("length", 1.0, {"target": 3}),), "needs parameters \\['scale'\\]"),
        ((("demo_judge", "1"),), "neither a number nor"),
        ((("demo_judge", {"start": 0, "end": 1}),), "a weight schedule is"),
        ((("demo_judge", {"start": 0, "end": 1, "steps": -1}),), "steps an int >= 0"),
        ((("demo_judge", math.nan),), "not finite"),
        ((("demo_judge",),), "rewards\\[0\\]: expected \\(name, weight\\)"),
        ((), "expected a list"),
    ],
)
def test_rewards_from_config_errors(terms, match):
    with pytest.raises(ConfigError, match=match):
        R.rewards_from_config(terms)


@pytest.mark.parametrize(
    "fn,match",
    [
        (lambda rec, c: 1.0 / 0.0 if rec["i"] == 2 else 1.0, "ZeroDivisionError"),
        (lambda rec, c: math.nan if rec["i"] == 2 else 1.0, "returned nan"),
        (lambda rec, c: math.inf if rec["i"] == 2 else 1.0, "returned inf"),
        (lambda rec, c: None if rec["i"] == 2 else 1.0, "returned None"),
    ],
)
def test_a_failing_reward_names_itself_and_the_record(fn, match):
    specs = [R.RewardSpec("judge", R.demo_judge, 0.0), R.RewardSpec("mine", fn, 1.0)]
    records = [{"i": i, "prompt": "What is 10+10?"} for i in range(4)]
    with pytest.raises(
        DataError, match=f'reward "mine" .*record 2.*{match}|reward "mine" {match}.* record 2'
    ):
        R.score_rule_rewards(specs, records, ["20"] * 4, 0)


def test_missing_record_field_is_a_data_error():
    specs = R.rewards_from_config((("exact_match", 1.0, {"field": "answer"}),))
    with pytest.raises(DataError, match='reward "exact_match" failed on record 1: .*no field'):
        R.score_rule_rewards(specs, [{"answer": "1"}, {"prompt": "p"}], ["1", "1"], 0)


# --------------------------------------------------------------------------------------------------
# Running moments and scaling (PPO-max).


def test_running_moments_match_numpy():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (1, 7, 32, 5, 64)]
    state = R.init_reward_stats()
    update = jax.jit(R.update_reward_stats)
    for k, batch in enumerate(batches):
        state = update(state, jnp.asarray(batch, jnp.float32))
        seen = np.concatenate(batches[: k + 1])
        assert float(state["count"]) == len(seen)
        np.testing.assert_allclose(state["mean"], seen.mean(), rtol=1e-5)
        np.testing.assert_allclose(state["var"], seen.var(), rtol=1e-5, atol=1e-7)
    assert all(v.dtype == jnp.float32 for v in state.values())


def test_scale_rewards_divides_by_the_running_std_only():
    rng = np.random.default_rng(1)
    rewards = rng.normal(5.0, 3.0, size=16)
    state = R.update_reward_stats(R.init_reward_stats(), jnp.asarray(rewards, jnp.float32))
    std = rewards.std()
    np.testing.assert_allclose(
        R.scale_rewards(jnp.asarray(rewards), state), rewards / std, rtol=1e-5
    )
    clipped = R.scale_rewards(jnp.asarray(rewards), state, clip=1.5)
    np.testing.assert_allclose(clipped, np.clip(rewards / std, -1.5, 1.5), rtol=1e-5)
    assert float(jnp.min(clipped)) < 1.5 < float(jnp.max(rewards / std))
    # no spread yet (no rewards, or all equal): std is taken as 1
    np.testing.assert_allclose(
        R.scale_rewards(jnp.asarray(rewards), R.init_reward_stats()), rewards, rtol=1e-6
    )
    flat = R.update_reward_stats(R.init_reward_stats(), jnp.full(4, 2.0))
    np.testing.assert_allclose(R.scale_rewards(jnp.full(4, 2.0), flat), 2.0)


# --------------------------------------------------------------------------------------------------
# Overlong penalty, InfAlign, LSC.


def np_overlong(lengths, max_len, buffer):
    out = []
    for n in lengths:
        if n <= max_len - buffer:
            out.append(0.0)
        elif n <= max_len:
            out.append((max_len - buffer - n) / buffer)
        else:
            out.append(-1.0)
    return np.array(out)


def test_overlong_penalty_matches_numpy():
    lengths = np.array([0, 10, 12, 13, 15, 16, 17, 100])
    got = jax.jit(lambda n: R.overlong_penalty(n, max_len=16, buffer=4))(jnp.asarray(lengths))
    np.testing.assert_allclose(got, np_overlong(lengths, 16, 4), rtol=1e-6)
    np.testing.assert_array_equal(
        R.overlong_penalty(lengths, max_len=16, buffer=0), [0, 0, 0, 0, 0, 0, -1, -1]
    )
    with pytest.raises(ValueError, match="buffer <= max_len"):
        R.overlong_penalty(lengths, max_len=4, buffer=8)


def test_calibrate_counts_ties_as_below():
    rng = np.random.default_rng(2)
    ref = rng.integers(0, 5, size=(6, 9)).astype(np.float64)  # many ties
    r = rng.integers(0, 5, size=6).astype(np.float64)
    want = np.array([np.mean(ref[b] <= r[b]) for b in range(6)])
    got = R.calibrate(jnp.asarray(r, jnp.float32), jnp.asarray(ref, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(R.infalign_transform(got, t=2.0), np.exp(2.0 * want), rtol=1e-6)
    np.testing.assert_allclose(
        R.infalign_transform(got, t=2.0, mode="worst"), np.exp(-2.0 * want), rtol=1e-6
    )
    with pytest.raises(ValueError, match="mode='mean'"):
        R.infalign_transform(got, t=1.0, mode="mean")


def test_lsc_is_reused_not_duplicated():
    assert R.lsc_transform is L.lsc_transform and R.lsc_combine is L.lsc_combine
