"""ADPA (the `adpa` family): the loss against float64 NumPy (values and gradients), its
documented choices, the tiny config end to end, and its one-line errors."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses
from jaxalign.config import apply_overrides, load_config
from jaxalign.errors import ConfigError, DataError
from jaxalign.train import setup, train
from jaxalign.train.run import frozen_params, init_params

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = [
    f"tokenizer={ROOT / 'data/demo/tokenizer.model'}",
    f"data.train={ROOT / 'data/demo/pairs_train.jsonl'}",
    "data.eval=",
]


def _config(*overrides):
    config = load_config(f"{ROOT / 'configs/adpa/tiny.py'}:smoke=true")
    return apply_overrides(config, [*BASE, *overrides])


def _packed_batch(rng, num_groups=2, pairs_per_group=2, T=9):
    """Random per-token arrays of a packed pair batch: each group's 2P sequences laid in rows of
    T tokens (several sequences per row), global sequence ids, padding = 2 P_total."""
    P = num_groups * pairs_per_group
    seq_index, mask = [], []
    for g in range(num_groups):
        row, rows = [], []
        for s in range(2 * pairs_per_group):
            length = int(rng.integers(2, 5))
            if len(row) + length > T:
                rows.append(row)
                row = []
            row += [g * 2 * pairs_per_group + s] * length
        rows.append(row)
        for row in rows:
            ids = np.full(T, 2 * P)
            ids[: len(row)] = row
            seq_index.append(ids)
            # Some counted tokens are prompt tokens (mask 0): they must not count.
            mask.append((ids < 2 * P) * (rng.random(T) > 0.2))
    seq_index, mask = np.stack(seq_index), np.stack(mask).astype(np.float64)
    logps = [np.log(rng.uniform(0.05, 1.0, seq_index.shape)) * mask for _ in range(4)]
    return P, seq_index, mask, logps


def _numpy_adpa(policy, ref, teacher, teacher_ref, mask, seq_index, P, num_groups, beta, alpha):
    """float64 loss per pair and d(sum_i w_i loss_i)/d policy, written from the formula."""
    per_group = P // num_groups

    def members(g, side, i):  # the tokens of pair (g, i)'s chosen (side 0) / rejected (1)
        return (seq_index == g * 2 * per_group + side * per_group + i) & (mask > 0)

    r = policy - ref
    a = teacher - teacher_ref
    loss, grad_terms = [], []
    for g in range(num_groups):
        for i in range(per_group):
            w, lo = members(g, 0, i), members(g, 1, i)
            D = r[w].sum() - r[lo].sum()
            n = max(w.sum() + lo.sum(), 1)
            both = w | lo
            mse = ((r[both] - a[both]) ** 2).sum() / n
            loss.append(np.logaddexp(0.0, -beta * D) + alpha * mse)
            s = 1.0 / (1.0 + np.exp(beta * D))  # sigmoid(-beta D)
            grad = np.zeros_like(policy)
            grad[w] += -beta * s
            grad[lo] += beta * s
            grad[both] += alpha * 2.0 * (r[both] - a[both]) / n
            grad_terms.append(grad)
    return np.array(loss), grad_terms


@pytest.mark.parametrize("beta,alpha", [(0.1, 1.0), (0.7, 0.3)])
def test_loss_and_gradient_match_numpy(beta, alpha):
    """Values and gradients (w.r.t. the student's and its reference's token log-probs) of
    `losses.adpa` equal float64 NumPy on a packed two-group batch; the teachers get no gradient."""
    rng = np.random.default_rng(int(beta * 10))
    P, seq_index, mask, logps = _packed_batch(rng)
    G = 2
    weights = rng.uniform(0.5, 1.5, P)
    want, grads = _numpy_adpa(*logps, mask, seq_index, P, G, beta, alpha)

    mask32, index = jnp.asarray(mask, jnp.float32), jnp.asarray(seq_index)

    def total(policy, ref, teacher, teacher_ref):
        loss, _ = losses.adpa(
            policy, ref, teacher, teacher_ref, mask32, index,
            num_pairs=P, num_groups=G, beta=beta, alpha=alpha,
        )  # fmt: skip
        return (loss * weights).sum(), loss

    args = [jnp.asarray(x, jnp.float32) for x in logps]  # the library runs in float32
    (_, got), g = jax.value_and_grad(total, argnums=(0, 1, 2, 3), has_aux=True)(*args)
    want_grad = sum(w * gr for w, gr in zip(weights, grads, strict=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g[0], want_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g[1], -want_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g[2], 0.0)
    np.testing.assert_array_equal(g[3], 0.0)


def test_documented_choices():
    """alpha = 0 is DPO on the sequence sums; the advantage term is a token-mean squared error
    of the data's tokens, zero when the student's token log-ratio equals the teacher's advantage
    token by token (not just in sum), positive when only the sums agree."""
    rng = np.random.default_rng(3)
    P, seq_index, mask, (policy, ref, teacher, teacher_ref) = _packed_batch(rng, num_groups=1)
    kw = dict(num_pairs=P, num_groups=1, beta=0.3)
    plain, _ = losses.adpa(policy, ref, teacher, teacher_ref, mask, seq_index, alpha=0.0, **kw)

    def sums(x):
        s = np.array([(x * mask)[seq_index == k].sum() for k in range(2 * P)])
        return s[:P], s[P:]

    dpo, _ = losses.dpo(*sums(policy), *sums(ref), beta=0.3)
    np.testing.assert_allclose(plain, dpo, rtol=1e-6)
    # The student's per-token shift equals the teacher's advantage: only DPO remains.
    matched = (ref + teacher - teacher_ref) * mask
    loss, metrics = losses.adpa(
        matched, ref, teacher, teacher_ref, mask, seq_index, alpha=2.0, **kw
    )
    np.testing.assert_allclose(metrics["adpa/advantage_mse"], 0.0, atol=1e-6)
    np.testing.assert_allclose(loss, metrics["adpa/dpo"], rtol=1e-6)
    # Same sums, shifted tokens: the token-level term sees it.
    first = (seq_index == 0) & (mask > 0)
    i, j = np.argwhere(first)[:2].T  # two counted tokens of sequence 0 (same row)
    shifted = matched.copy()
    shifted[i[0], j[0]] += 0.5
    shifted[i[0], j[1]] -= 0.5
    _, metrics = losses.adpa(shifted, ref, teacher, teacher_ref, mask, seq_index, alpha=2.0, **kw)
    assert metrics["adpa/advantage_mse"][0] > 0.1
    np.testing.assert_allclose(metrics["adpa/advantage_mse"][1:], 0.0, atol=1e-6)


def test_family_step_is_finite():
    """The fast sibling of the end-to-end run: the adpa family's objective on one batch of the
    tiny config with its three frozen models (student's reference, teacher, teacher's reference):
    a finite loss equal to dpo + alpha * mse, the student's reference equal to its initial weights
    (DPO term log 2 at the start)."""
    run = setup(_config())
    params = init_params(run)
    frozen = frozen_params(run, params)
    assert sorted(frozen) == ["ref", "teacher", "teacher_ref"]
    batch = next(iter(run.batches(run.config.data.train, train=True)))
    micro = jax.tree.map(lambda x: x[0], run.global_batch([batch]))
    loss, weight, metrics = jax.jit(run.objective.fn)(params, frozen, micro)
    m = {k: float(v / weight) for k, v in metrics.items()}
    assert np.isfinite(float(loss)) and weight == run.config.data.batch_size
    np.testing.assert_allclose(m["adpa/dpo"], np.log(2.0), rtol=1e-6)
    assert m["adpa/advantage_mse"] > 0 and m["adpa/teacher_margin"] != 0
    np.testing.assert_allclose(loss / weight, m["adpa/dpo"] + m["adpa/advantage_mse"], rtol=1e-5)


@pytest.mark.slow
def test_tiny_config_runs(tmp_path):
    """2 steps of configs/adpa/tiny.py (preset teachers): finite loss, both terms and the
    teacher's margin logged, the loss = dpo + alpha * mse, a checkpoint written."""
    train(_config("steps=2", "checkpoint.every=2"), tmp_path)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rows = [r for r in rows if r["split"] == "train"]
    assert len(rows) == 2
    for r in rows:
        assert np.isfinite(r["loss"]) and r["adpa/advantage_mse"] > 0
        assert np.isfinite(r["adpa/teacher_margin"]) and r["adpa/teacher_margin"] != 0
        np.testing.assert_allclose(r["loss"], r["adpa/dpo"] + r["adpa/advantage_mse"], rtol=1e-5)
    assert (tmp_path / "checkpoints" / "2").is_dir()


@pytest.mark.parametrize(
    "override,message",
    [
        ("distill.teacher_ref=", "distill.teacher_ref is empty"),
        ("distill.teacher_ref=model:x", 'distill.teacher_ref="model:x": expected'),
        ("distill.teacher_ref=preset:nope", 'distill.teacher_ref="preset:nope": unknown preset'),
        ("distill.teacher=", 'distill.teacher="": expected'),
        ("distill.dpo_beta=0.0", "distill.dpo_beta=0.0: expected > 0"),
        ("distill.alpha=-1.0", "distill.alpha=-1.0: expected >= 0"),
        ("lora.rank=4", "lora.rank=4: adpa holds two teachers"),
        ("reference.update=soft", 'reference.update="soft": adpa keeps'),
        ("data.ref_logps=x.jsonl", "data.ref_logps: cached reference log-probs"),
    ],
)
def test_bad_config_is_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        setup(_config(override))
    assert "\n" not in str(e.value)


def test_bad_record_names_file_and_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    good = open(ROOT / "data/demo/pairs_train.jsonl").readline()
    bad.write_text(good + json.dumps({"prompt": "1+1=", "chosen": "2"}) + "\n")
    run = setup(_config(f"data.train={bad}"))
    with pytest.raises(DataError, match=rf"{bad}.*line 2") as e:
        next(iter(run.batches(str(bad), train=True)))
    assert "\n" not in str(e.value)
