"""Every trainer family, by name from its config, on the bundled demo task: a short run moves its
metric the right way; cached reference log-probs reproduce the on-the-fly run; LD-DPO prefixes
and BCO's running delta against plain NumPy.

The metrics are measured on the data the run trains on: the eval stream reads the training file
with the training seed, so its first batches are the first training batches. A dozen CPU steps
from a short SFT warm start do not generalise on the arithmetic task (measured: DPO, 12 steps at
lr 1e-3 from a 40-step SFT, held-out margin -0.008), so held-out gains are for the real configs.
"""

import json
import pathlib

import jax
import numpy as np
import pytest

from jaxalign import losses, models
from jaxalign.checkpoint import manager as ckpt
from jaxalign.config import apply_overrides, load_config
from jaxalign.data import CACHE_FIELDS, load_tokenizer, make_pair_pipeline, make_sft_pipeline
from jaxalign.train import init_params, objectives, reward, setup, train
from jaxalign.train.cache_ref import cache_reference, reference_logps

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# Short runs: a few real steps, evaluation on the first 4 batches before and after.
SHORT = [
    "steps=12",
    "log_every=1",
    "eval_every=0",
    "eval_batches=4",
    "checkpoint.every=100",
    "data.batch_size=16",
    "optimizer.warmup_steps=0",
    "optimizer.lr=1e-3",
]


def _config(name, *overrides, arg="smoke=True"):
    config = load_config(f"{CONFIGS / name}:{arg}")
    return apply_overrides(config, [*SHORT, *overrides])


def _records(workdir, split):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A short SFT run: the warm start every family begins from."""
    workdir = tmp_path_factory.mktemp("sft")
    train(_config("sft/tiny.py", "steps=24", "data.eval=", "checkpoint.every=24"), workdir)
    return workdir


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The first 320 demo training pairs (a small file keeps the reference cache quick)."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    lines = (ROOT / "data/demo/pairs_train.jsonl").read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:320]))
    return f"data.train={path}", f"data.eval={path}"


UNPAIRED = "data/demo/unpaired_train.jsonl"


def _start(sft_dir):
    return f"model.init_from=checkpoint:{sft_dir}"


@pytest.fixture(scope="module")
def dpo_run(sft_dir, pairs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dpo")
    config = _config("dpo/tiny.py", _start(sft_dir), *pairs)
    return config, workdir, train(config, workdir)


def test_dpo_raises_the_margin_and_accuracy(dpo_run):
    _, workdir, result = dpo_run
    before, after = _records(workdir, "eval")[0], result["eval"]
    assert before["rewards/margin"] == 0.0  # reference = initial policy
    assert after["rewards/margin"] > 0.0
    assert after["rewards/accuracy"] > 0.5
    assert after["loss"] < before["loss"]


def test_reference_free_simpo_raises_the_margin(sft_dir, pairs, tmp_path):
    config = _config("dpo/tiny_simpo.py", _start(sft_dir), *pairs)
    assert not setup(config).needs_ref
    result = train(config, tmp_path)
    before, after = _records(tmp_path, "eval")[0], result["eval"]
    assert after["rewards/margin"] > before["rewards/margin"]
    assert after["logps/accuracy"] >= before["logps/accuracy"]


def test_cached_reference_logps_equal_the_on_the_fly_run(dpo_run, tmp_path):
    config, workdir, result = dpo_run
    cache = tmp_path / "ref.jsonl"
    counts = cache_reference(config, str(cache))
    assert list(counts.values()) == [320]
    cached = _config(
        "dpo/tiny.py",
        f"model.init_from={config.model.init_from}",
        f"data.train={config.data.train}",
        f"data.eval={config.data.eval}",
        f"data.ref_logps={cache}",
    )
    run = setup(cached)
    assert not run.needs_ref  # no reference weights, no reference forward
    # The joined numbers are exactly what the first training batch computes on the fly, and so
    # are that batch's loss and gradient (up to float32 rounding: the programs differ).
    batch = next(run.batches(cached.data.train, train=True))
    ref = init_params(run)
    compute = jax.jit(lambda p, b: reference_logps(run.model_config, p, b, mesh=run.mesh))
    fresh = compute(ref, run.global_batch([batch]))
    for field, values in zip(CACHE_FIELDS, fresh, strict=True):
        np.testing.assert_array_equal(batch[field], np.asarray(values), err_msg=field)
    on_the_fly = {k: v for k, v in batch.items() if k not in CACHE_FIELDS}
    grads = [
        jax.jit(jax.value_and_grad(lambda p, r, b, f=objective.fn: f(p, r, b)[0]))(ref, r, b)
        for objective, r, b in [
            (run.objective, None, batch),
            (setup(config).objective, ref, on_the_fly),
        ]
    ]
    np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads[1][1]))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale),
        *[g for _, g in grads],
    )
    got = train(cached, tmp_path / "run")
    for split in ("train", "eval"):
        want = result[split]
        for key in ("loss", "logps/chosen", "logps/rejected"):
            np.testing.assert_allclose(got[split][key], want[key], rtol=1e-6, err_msg=key)
        # Rewards are beta * (logp - ref): differences of numbers of size |logp|, so their
        # float32 rounding is relative to beta |logp|, not to the (small) reward itself.
        scale = config.loss.beta * abs(want["logps/chosen"])
        for key in ("rewards/margin", "rewards/chosen", "rewards/rejected"):
            np.testing.assert_allclose(got[split][key], want[key], atol=1e-6 * scale, err_msg=key)
    abstract = run.abstract_target()
    states = []
    for where in (workdir, tmp_path / "run"):
        manager = ckpt.make_manager(where, async_save=False)
        states.append(ckpt.restore(manager, abstract)[0]["params"])
        manager.close()
    # Adam's m / sqrt(v) turns a rounding-level gradient difference in a coordinate whose
    # gradient is near zero into a difference of up to ~lr in that coordinate's update, so after
    # a few steps the params agree to 1% of one step, not to float32 rounding.
    atol = 0.01 * config.optimizer.lr
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=atol), *states)


def test_mix_carries_bco_delta_as_the_running_mean_of_rewards(sft_dir, tmp_path):
    config = _config("dpo/tiny_mix.py", _start(sft_dir), "steps=3", "data.eval=")
    train(config, tmp_path)
    records = _records(tmp_path, "train")
    batch_means = [r["bco_pair/delta/batch_reward"] for r in records]
    # Full batches of 16 pairs: the running mean is the plain mean of the batch means.
    np.testing.assert_allclose(records[-1]["loss_state/delta"], np.mean(batch_means), rtol=1e-5)
    assert records[-1]["loss_state/delta_count"] == 16 * 3
    run = setup(config)
    manager = ckpt.make_manager(tmp_path, async_save=False)
    state, _ = ckpt.restore(manager, run.abstract_target())
    manager.close()
    np.testing.assert_allclose(state["loss_state"]["delta"], records[-1]["loss_state/delta"])


# bco slow: kto is the fast run of the unpaired family (BCO's loss is pinned against NumPy).
@pytest.mark.parametrize("loss", ["kto", pytest.param("bco", marks=pytest.mark.slow)])
def test_unpaired_widens_the_desirable_undesirable_reward_gap(sft_dir, tmp_path, loss):
    config = _config(
        "kto/tiny.py",
        _start(sft_dir),
        f"data.eval={UNPAIRED}",
        arg=f"smoke=True,loss='{loss}'",
    )
    result = train(config, tmp_path)
    before, after = _records(tmp_path, "eval")[0], result["eval"]
    assert before["rewards/gap"] == 0.0
    assert after["rewards/gap"] > 0.0
    if loss == "kto":
        assert "kl" in after


def test_npo_lowers_forget_set_likelihood(sft_dir, tmp_path):
    result = train(_config("npo/tiny.py", _start(sft_dir)), tmp_path)
    before, after = _records(tmp_path, "eval")[0], result["eval"]
    assert after["logps/policy"] < before["logps/policy"]
    assert np.isfinite(after["sft/loss"])  # the retain term ran


def test_reward_model_learns_and_scores(sft_dir, pairs, tmp_path):
    result = train(_config("reward/tiny.py", _start(sft_dir), *pairs, "steps=20"), tmp_path)
    before, after = _records(tmp_path, "eval")[0], result["eval"]
    assert before["loss"] == pytest.approx(np.log(2))  # zero head: every reward 0
    assert after["rewards/accuracy"] > 0.5 and after["loss"] < before["loss"]
    model_config, params = reward.load_reward_model(tmp_path)
    assert np.abs(params[reward.HEAD]["kernel"]).sum() > 0
    tok = load_tokenizer(str(ROOT / "data/demo/tokenizer.model"))
    batch = next(
        make_pair_pipeline(
            pairs[0].partition("=")[2],  # pairs it trained on
            tok,
            batch_size=8,
            max_len=48,
            max_prompt_len=32,
            shuffle=False,
        )
    )
    rewards = np.asarray(reward.score(model_config, params, batch, num_sequences=16))
    # Each reward is the head on the hidden state of its sequence's last token, the sequence run
    # alone (no padding): computed here directly from the model and the head's weights.
    head = jax.device_get(params[reward.HEAD])
    decoder = {k: v for k, v in params.items() if k != reward.HEAD}
    for s in range(16):
        row = np.nonzero((batch["seq_index"] == s).any(axis=1))[0][0]
        tokens = batch["tokens"][row][batch["seq_index"][row] == s]
        hidden = models.forward(model_config, decoder, tokens[None])[0, -1]
        want = np.asarray(hidden, np.float64) @ head["kernel"][:, 0] + head["bias"][0]
        np.testing.assert_allclose(rewards[s], want, rtol=1e-5, atol=1e-5)
    assert np.abs(rewards).min() > 1e-3  # so a score of zeros could not pass


def _prefix_numpy(batch, S):
    """Per sequence, the mask of its first min(|y_w|, |y_l|) counted tokens, by walking tokens."""
    mask, index = batch["loss_mask"], batch["seq_index"]
    lengths = np.zeros(S)
    for r, t in zip(*np.nonzero(index >= 0), strict=True):
        lengths[index[r, t]] += mask[r, t]
    P = S // 2
    limit = np.minimum(lengths[:P], lengths[P:])
    limit = np.concatenate([limit, limit])
    seen = np.zeros(S)
    out = np.zeros_like(mask)
    for r in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            s = index[r, t]
            if s >= 0 and mask[r, t]:
                seen[s] += 1
                out[r, t] = seen[s] <= limit[s]
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_ld_dpo_prefix_mask_matches_a_numpy_walk(pack):
    tok = load_tokenizer(str(ROOT / "data/demo/tokenizer.model"))
    pipe = make_pair_pipeline(
        str(ROOT / "data/demo/pairs_train.jsonl"),
        tok,
        batch_size=6,
        max_len=40,
        max_prompt_len=24,
        pack=pack,
        seed=1,
        train_on_prompt=pack,
    )
    batch = next(pipe)
    S = 12
    index, total = objectives.sequence_index(batch, S, 1)
    lengths = objectives.sequence_sums(batch["loss_mask"], index, total)
    got = objectives.prefix_mask(
        batch["loss_mask"], index, total, objectives.pair_min_lengths(lengths, 1)
    )
    np.testing.assert_array_equal(np.asarray(got), _prefix_numpy(batch, S))


def test_ld_dpo_alpha_one_is_dpo_through_the_objective(tmp_path):
    config = _config("dpo/tiny.py")
    run = setup(config)
    tok = load_tokenizer(str(ROOT / config.tokenizer))
    path = tmp_path / "pairs.jsonl"
    answers = [("2", "3 or 4"), ("12", "1"), ("7", "seven"), ("40", "41")]
    path.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i}?", "chosen": c, "rejected": r}) + "\n"
            for i, (c, r) in enumerate(answers)
        )
    )
    batch = next(
        make_pair_pipeline(str(path), tok, batch_size=4, max_len=40, max_prompt_len=24, pack=True)
    )
    from jaxalign import models

    params = models.init_params(run.model_config, jax.random.key(0))
    ref = models.init_params(run.model_config, jax.random.key(1))
    # One pass for all three: a mix reports every term's per-pair loss.
    terms = [("dpo", 1.0), ("ld_dpo", 1.0, {"alpha": 1.0}), ("ld_dpo", 1.0, {"alpha": 0.0})]
    objective = objectives.paired_objective(run.model_config, losses.mix(terms))
    _, weight, metrics = jax.jit(objective.fn)(params, ref, batch)
    dpo, ld1, ld0 = (metrics[k] / weight for k in ("dpo/loss", "ld_dpo#1/loss", "ld_dpo#2/loss"))
    np.testing.assert_allclose(ld1, dpo, rtol=1e-6)
    assert not np.isclose(ld0, dpo)


def test_bco_running_delta_update_is_the_mean_of_all_rewards():
    rng = np.random.default_rng(0)
    state = {"delta": np.float32(0.0), "delta_count": np.float32(0.0)}
    seen = []
    for w in (3, 5, 8):
        rewards = rng.normal(size=w)
        seen.extend(rewards)
        state = objectives.update_loss_state(state, {"delta/batch_reward": rewards.mean()}, w)
        np.testing.assert_allclose(state["delta"], np.mean(seen), rtol=1e-6)
    assert state["delta_count"] == 16


def test_kl_sequences_pair_each_prompt_with_the_next_completion():
    tok = load_tokenizer(str(ROOT / "data/demo/tokenizer.model"))
    from jaxalign.data import make_unpaired_pipeline

    kw = dict(batch_size=4, max_len=40, max_prompt_len=24, shuffle=False)
    path = str(ROOT / "data/demo/unpaired_train.jsonl")
    batch = next(make_unpaired_pipeline(path, tok, kl_sequences=True, **kw))
    plain = next(make_sft_pipeline(path, tok, **kw))  # the same records as SFT (no labels)

    def text(b, s):
        row = np.nonzero((b["seq_index"] == s).any(axis=1))[0][0]
        keep = b["seq_index"][row] == s
        return b["tokens"][row][keep], b["loss_mask"][row][keep] > 0

    for i in range(3):
        tokens, mask = text(batch, 4 + i)
        own_tokens, own_mask = text(plain, i)
        next_tokens, next_mask = text(plain, i + 1)
        np.testing.assert_array_equal(tokens[~mask], own_tokens[~own_mask])  # prompt
        np.testing.assert_array_equal(tokens[mask][1:], next_tokens[next_mask][1:])  # completion


def test_data_fields_feed_modpo_margins_and_mm_dpo_beta(tmp_path):
    config = _config("dpo/tiny.py")
    run = setup(config)
    tok = load_tokenizer(str(ROOT / config.tokenizer))
    path = tmp_path / "pairs.jsonl"
    rows = [
        {
            "prompt": "What is 1+1?",
            "chosen": "2",
            "rejected": "3",
            "chosen_margins": [0.5, 1.0],
            "rejected_margins": [0.0, 2.0],
            "beta_feature": 1.0,
        },
        {
            "prompt": "What is 2+2?",
            "chosen": "4",
            "rejected": "5",
            "chosen_margins": [1.0, 0.0],
            "rejected_margins": [0.5, 0.5],
            "beta_feature": -1.0,
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = ("chosen_margins", "rejected_margins", "beta_feature")
    batch = next(
        make_pair_pipeline(
            str(path),
            tok,
            batch_size=2,
            max_len=40,
            max_prompt_len=24,
            shuffle=False,
            extra_fields=fields,
        )
    )
    assert batch["chosen_margins"].shape == (2, 2) and batch["beta_feature"].shape == (2,)
    from jaxalign import models

    params = models.init_params(run.model_config, jax.random.key(0))
    ref = models.init_params(run.model_config, jax.random.key(1))
    terms = [
        ("dpo", 1.0),
        ("modpo", 1.0, {"weights": (1.0, 0.0, 0.0)}),  # margins weighted 0: dpo
        ("modpo", 1.0, {"weights": (1.0, 0.5, 0.25)}),
        ("mm_dpo", 1.0, {"w": 0.5}),
    ]
    objective = objectives.paired_objective(run.model_config, losses.mix(terms))
    _, weight, metrics = jax.jit(objective.fn)(params, ref, batch)
    mean = {k: float(v / weight) for k, v in metrics.items()}
    assert mean["modpo#1/loss"] == pytest.approx(mean["dpo/loss"], rel=1e-6)
    assert mean["modpo#2/loss"] != pytest.approx(mean["dpo/loss"], rel=1e-3)  # margins read
    # beta_i = 0.1 (1 + 0.5 f_i), f = (1, -1): 0.15 and 0.05, mean 0.1.
    assert mean["mm_dpo/beta"] == pytest.approx(0.1, rel=1e-6)
