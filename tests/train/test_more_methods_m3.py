"""Multi-objective reward models and directions (DPA, Wang et al. 2024) through the trainers: the
tiny reward_multi config trains, checkpoints a k-output head and scores v . r (offline and on
rollout rows, as the rft trainer's reward); direction-conditioned SFT writes each record's
direction into its system message; bad records and config keys are one-line errors."""

import json
import pathlib

import jax
import numpy as np
import pytest

import jaxalign.losses as L
from jaxalign import models
from jaxalign.config import apply_overrides, load_config
from jaxalign.data import (
    direction_system,
    load_tokenizer,
    make_direction_system,
    make_ratings_pipeline,
    make_sft_pipeline,
)
from jaxalign.errors import ConfigError, DataError
from jaxalign.models import heads
from jaxalign.rl import rewards as rl_rewards
from jaxalign.train import families, reward, setup, train

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "data/demo/tokenizer.model")
RATINGS = str(ROOT / "data/demo/ratings_train.jsonl")


def _config(name, *overrides):
    return apply_overrides(load_config(f"{ROOT / 'configs' / name}:smoke=True"), list(overrides))


@pytest.fixture(scope="module")
def morm_dir(tmp_path_factory):
    """The tiny multi-objective reward model, 2 steps, no evaluation."""
    workdir = tmp_path_factory.mktemp("morm")
    config = _config(
        "reward/multi_objective_tiny.py",
        "steps=2",
        "log_every=1",
        "data.eval=",
        "checkpoint.every=2",
        f"data.train={RATINGS}",
    )
    train(config, workdir)
    return workdir


def test_multi_objective_reward_model_trains_and_checkpoints_a_k_output_head(morm_dir):
    records = [json.loads(x) for x in (morm_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2]
    for r in train_records:
        assert np.isfinite(r["loss"])
        assert {"rewards/mse_0", "rewards/mse_1", "rewards/mae"} <= set(r)
    # Zero head at step 0: the loss is the mean square of the ratings of the first batch.
    assert train_records[0]["loss"] > 0.05
    assert (morm_dir / "checkpoints" / "2").is_dir()
    model_config, params = reward.load_reward_model(morm_dir)
    assert params[heads.REWARD_HEAD]["kernel"].shape == (model_config.d_model, 2)
    assert np.abs(np.asarray(params[heads.REWARD_HEAD]["kernel"])).sum() > 0


def test_scores_are_the_head_on_the_last_token_and_direction_dots_them(morm_dir):
    model_config, params = reward.load_reward_model(morm_dir)
    tok = load_tokenizer(TOKENIZER)
    pipe = make_ratings_pipeline(
        RATINGS,
        tok,
        num_ratings=2,
        batch_size=4,
        max_len=48,
        max_prompt_len=32,
        shuffle=False,
        num_epochs=1,
    )
    batch = next(pipe)
    assert batch["ratings"].shape == (4, 2)
    first = json.loads(pathlib.Path(RATINGS).read_text().splitlines()[0])
    np.testing.assert_array_equal(batch["ratings"][0], first["ratings"])
    r = np.asarray(reward.score(model_config, params, batch))
    assert r.shape == (4, 2)
    # Sequence 0 alone, by hand: the head on the hidden state of its last real position.
    n = int((batch["segment_ids"][0] > 0).sum())
    decoder = heads.decoder_params(params)
    hidden = models.forward(
        model_config, decoder, batch["tokens"][:1, :n], batch["positions"][:1, :n]
    )
    head = jax.device_get(params[heads.REWARD_HEAD])
    want = np.asarray(hidden[0, n - 1], np.float64) @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(r[0], want, rtol=1e-4, atol=1e-5)
    v = np.array([0.6, 0.8])
    rv = np.asarray(reward.score(model_config, params, batch, direction=v))
    np.testing.assert_allclose(rv, r @ v, rtol=1e-5, atol=1e-6)


def _write(tmp_path, records):
    path = tmp_path / "ratings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize(
    ("ratings", "match"),
    [
        ([1.0], r'line 2: field "ratings" has 1 values \(expected a list of 2 finite numbers\)'),
        ([1.0, "high"], r"line 2: field \"ratings\" holds 'high'"),
        ([1.0, True], r'line 2: field "ratings" holds True'),
        ("1, 2", r'line 2: field "ratings" has type str'),
    ],
)
def test_a_bad_ratings_record_is_a_data_error_naming_file_and_line(tmp_path, ratings, match):
    good = {"prompt": "What is 1+1?", "response": "2", "ratings": [1.0, 0.0]}
    path = _write(tmp_path, [good, good | {"ratings": ratings}])
    with pytest.raises(DataError, match=match) as e:
        make_ratings_pipeline(path, TOKENIZER, num_ratings=2, batch_size=2, max_len=32)
    assert "ratings.jsonl" in str(e.value) and "\n" not in str(e.value)


def test_bad_config_keys_are_config_errors():
    with pytest.raises(ConfigError, match="reward.num_objectives=0: expected an int >= 1"):
        setup(_config("reward/multi_objective_tiny.py", "reward.num_objectives=0"))
    with pytest.raises(ConfigError, match="reward.num_objectives=2: trainer reward trains"):
        setup(_config("reward/tiny.py", "reward.num_objectives=2"))
    with pytest.raises(ConfigError, match='unknown key "reward.num_objective"'):
        _config("reward/multi_objective_tiny.py", "reward.num_objective=2")


def test_reward_model_scores_of_rollout_rows_follow_the_direction(morm_dir):
    """The online scorer's reward-model path: r_v = v . r of each row, r the k = 2 head outputs
    on the row's last real position; a missing or wrong-length direction is a ConfigError."""
    model_config, params = reward.load_reward_model(morm_dir)
    tok = load_tokenizer(TOKENIZER)
    batch = next(
        make_ratings_pipeline(
            RATINGS, tok, num_ratings=2, batch_size=4, max_len=48, shuffle=False, num_epochs=1
        )
    )
    r = np.asarray(reward.score(model_config, params, batch), np.float64)
    v = L.unit_direction([1.0, 0.5])
    got = rl_rewards.reward_model_scores(model_config, params, batch, v)
    np.testing.assert_allclose(got, r @ np.array(v), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="has 2 objectives: rl.reward_direction must give 2"):
        rl_rewards.reward_model_scores(model_config, params, batch)
    with pytest.raises(ConfigError, match=r"has 3 numbers; the reward model has 2 objectives"):
        rl_rewards.reward_model_scores(model_config, params, batch, (1.0, 0.0, 0.0))


@pytest.mark.slow  # ~1 min on 2 loaded cores; fast sibling: the test above (the same scoring)
def test_directional_rejection_sampling_runs_with_the_multi_objective_model(morm_dir, tmp_path):
    config = _config(
        "dpa/rft_tiny.py",
        "steps=2",
        "data.batch_size=8",
        f"rl.reward_model={morm_dir}",
        "checkpoint.every=2",
    )
    train(config, tmp_path)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert train_records and all(np.isfinite(r["loss"]) for r in train_records)
    assert all("rewards/reward_model" in r for r in train_records)
    assert (tmp_path / "checkpoints" / "2").is_dir()


def test_direction_system_message_renders_the_normalised_direction():
    rec = {"prompt": "What is 1+1?", "completion": "2", "direction": [3, 4], "system": "Be kind."}
    (out,) = direction_system(rec, objectives=("helpfulness", "verbosity"))
    assert out["system"] == (
        "Be kind.\n\nYou are a helpful assistant. Your response should maximize weighted rating "
        "= helpfulness*0.6 + verbosity*0.8"
    )
    assert "direction" not in out
    (custom,) = direction_system(
        rec | {"system": None}, objectives=("a", "b"), template="Maximise {weighted}."
    )
    assert custom["system"] == "Maximise a*0.6 + b*0.8."


@pytest.mark.parametrize(
    ("direction", "match"),
    [
        ([0, 0], r'line 1: field "direction" is zero'),
        ([1.0], r'line 1: field "direction" is \[1.0\]'),
        (None, r'line 1: field "direction" is missing'),
    ],
)
def test_a_bad_direction_is_a_data_error_naming_file_and_line(tmp_path, direction, match):
    rec = {"prompt": "What is 1+1?", "completion": "2"}
    if direction is not None:
        rec["direction"] = direction
    path = _write(tmp_path, [rec])
    transform = make_direction_system(objectives=("helpfulness", "verbosity"))
    with pytest.raises(DataError, match=match):
        make_sft_pipeline(path, TOKENIZER, batch_size=1, max_len=128, transforms=(transform,))


def test_direction_conditioned_sft_runs_on_prompts_that_carry_the_direction(tmp_path):
    config = _config("dpa/sft_tiny.py", "steps=2", "checkpoint.every=2")
    run = setup(config)
    batch = next(families.offline_batches(run, config.data.train, train=False))
    tok = load_tokenizer(TOKENIZER)
    # The first sequence's prompt tokens (loss mask off), decoded: the demo tokenizer has no
    # pieces for "*" (unknown tokens), the names and the normalised components survive.
    n_prompt = int(np.argmax(batch["loss_mask"][0] > 0)) + 1
    text = tok.decode([int(t) for t in batch["tokens"][0, :n_prompt]])
    lines = (ROOT / config.data.train).read_text().splitlines()
    first = next(r for r in map(json.loads, lines) if text.rstrip().endswith(r["prompt"]))
    v = np.array(first["direction"]) / np.linalg.norm(first["direction"])
    assert f"helpfulness ⁇ {v[0]:.4g} + verbosity ⁇ {v[1]:.4g}" in text, text
    train(config, tmp_path)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records if r["split"] == "train")
    assert (tmp_path / "checkpoints" / "2").is_dir()
