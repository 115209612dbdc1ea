"""CUT, ASFT, AFT constraint ranking and Re-Align's context-contrast term against float64 NumPy
written from the formulas (values and gradients: central differences of the NumPy reference),
and the choices each loss documents (which forward gets gradients, the dropped reconstruction
term, the boundary hinge, the contrast side)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign.losses as L


def logsig(x):
    return -np.logaddexp(0.0, -x)


def log1mexp(x):
    return np.log(-np.expm1(x))


def np_cut(b, threshold=1.1, unlikelihood_weight=1.0):
    logp, judged, m = b["policy_token_logps"], b["judged_token_logps"], b["response_mask"]
    flag = (np.exp(judged) / np.exp(logp)) > threshold
    per_token = np.where(flag, -unlikelihood_weight * np.log(1.0 - np.exp(logp)), -logp)
    return (per_token * m).sum(-1) / np.maximum(m.sum(-1), 1.0)


def np_asft(b, lam=0.1):
    avg_w = b["policy_chosen_logps"] / b["chosen_lengths"]
    avg_l = b["policy_rejected_logps"] / b["rejected_lengths"]

    def odds(a):
        p = np.exp(a)
        return np.log(p / (1.0 - p))

    return -avg_w + lam * (-logsig(odds(avg_w)) - logsig(-odds(avg_l)))


def np_aft(b, margin=1.0, boundary_weight=1.0):
    pos = b["policy_positive_logps"] / b["positive_lengths"]
    neg = b["policy_negative_logps"] / b["negative_lengths"]
    ref = b["ref_negative_logps"] / b["negative_lengths"]
    out = []
    for i in range(pos.shape[0]):
        total = sum(np.exp(n - p) for p in pos[i] for n in neg[i])
        boundary = np.mean([max(0.0, r - margin - n) for r, n in zip(ref[i], neg[i], strict=True)])
        out.append(np.log(1.0 + total) + boundary_weight * boundary)
    return np.asarray(out)


def np_realign(b, beta=0.1):
    s_w = b["policy_chosen_logps"] - b["ref_chosen_logps"]
    s_c = b["policy_contrast_logps"] - b["ref_contrast_logps"]
    return -logsig(beta * (s_w - s_c))


CASES = [
    ("cut", {}, np_cut),
    ("cut", {"threshold": 1.5, "unlikelihood_weight": 0.5}, np_cut),
    ("asft", {}, np_asft),
    ("asft", {"lam": 0.7}, np_asft),
    ("aft", {}, np_aft),
    ("aft", {"margin": 0.2, "boundary_weight": 3.0}, np_aft),
    ("realign", {}, np_realign),
    ("realign", {"beta": 0.5}, np_realign),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]
# Inputs that are data or enter only through a stop-gradient.
NO_GRAD = {
    "judged_token_logps",
    "response_mask",
    "chosen_lengths",
    "rejected_lengths",
    "positive_lengths",
    "negative_lengths",
}
BATCH, TOKENS, P, N = 4, 7, 2, 3


def make_inputs(name, seed=0):
    rng = np.random.default_rng(seed)
    if name == "cut":
        logp = -rng.uniform(0.05, 4.0, (BATCH, TOKENS))
        # ratios well away from any threshold, so the flags do not move under a finite difference
        ratio = rng.choice([-1.0, 1.0], (BATCH, TOKENS)) * rng.uniform(0.6, 1.0, (BATCH, TOKENS))
        mask = (np.arange(TOKENS) < rng.integers(2, TOKENS + 1, (BATCH, 1))).astype(np.float64)
        return {
            "policy_token_logps": logp,
            "judged_token_logps": logp + ratio,
            "response_mask": mask,
        }
    if name == "aft":
        b = {
            "policy_positive_logps": -rng.uniform(2.0, 30.0, (BATCH, P)),
            "policy_negative_logps": -rng.uniform(2.0, 30.0, (BATCH, N)),
            "positive_lengths": rng.integers(1, 12, (BATCH, P)).astype(np.float64),
            "negative_lengths": rng.integers(1, 12, (BATCH, N)).astype(np.float64),
        }
        # half the negatives far below the reference (boundary active), half above it
        offset = np.where(rng.random((BATCH, N)) < 0.5, 3.0, -3.0) * b["negative_lengths"]
        b["ref_negative_logps"] = b["policy_negative_logps"] + offset
        return b
    b = {}
    for key in L.inputs(name):
        if key.endswith("_logps"):
            b[key] = -rng.uniform(5.0, 60.0, BATCH)
        elif key.endswith("_lengths"):
            b[key] = rng.integers(1, 40, BATCH).astype(np.float64)
    return b


def finite_diff(f, b, key, h=1e-6):
    grad = np.zeros_like(b[key])
    for idx in np.ndindex(b[key].shape):
        plus, minus = dict(b), dict(b)
        plus[key], minus[key] = b[key].copy(), b[key].copy()
        plus[key][idx] += h
        minus[key][idx] -= h
        grad[idx] = (f(plus).sum() - f(minus).sum()) / (2 * h)
    return grad


def jax_loss(name, b, hyper):
    return L.call(name, {k: jnp.asarray(v) for k, v in b.items()}, **hyper)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize(("name", "hyper", "ref"), CASES, ids=IDS)
def test_values_and_grads_match_numpy(name, hyper, ref):
    b = make_inputs(name)
    loss, metrics = jax_loss(name, b, hyper)
    assert loss.shape == (BATCH,) and loss.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(loss), ref(b, **hyper), rtol=1e-10, atol=1e-12)
    assert all(v.shape == (BATCH,) for v in metrics.values())
    keys = [k for k in b if k not in NO_GRAD]
    grads = jax.grad(lambda xs: jax_loss(name, {**b, **xs}, hyper)[0].sum())(
        {k: jnp.asarray(b[k]) for k in keys}
    )
    for key in keys:
        expected = finite_diff(lambda bb: ref(bb, **hyper), b, key)
        np.testing.assert_allclose(
            np.asarray(grads[key]), expected, rtol=1e-6, atol=1e-8, err_msg=key
        )


def test_cut_trains_the_forward_without_the_judgment():
    """The flags come from the judged forward but carry no gradient into it."""
    b = {k: jnp.asarray(v) for k, v in make_inputs("cut").items()}
    grad = jax.grad(lambda j: L.cut(b["policy_token_logps"], j, b["response_mask"])[0].sum())(
        b["judged_token_logps"]
    )
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_cut_flags_tokens_the_judgment_makes_likelier():
    """ratio p(y_t|x,j)/p(y_t|x) = 2 > 1.1: unlikelihood; 0.5: NLL; padding counts for nothing."""
    logp = jnp.log(jnp.asarray([[0.4, 0.4, 0.9]]))
    judged = logp + jnp.log(jnp.asarray([[2.0, 0.5, 2.0]]))
    mask = jnp.asarray([[1.0, 1.0, 0.0]])
    loss, metrics = L.cut(logp, judged, mask)
    np.testing.assert_allclose(float(loss[0]), (-np.log(0.6) - np.log(0.4)) / 2, rtol=1e-12)
    assert float(metrics["cut/flagged"][0]) == 0.5
    # a higher threshold flags nothing: plain token-mean NLL
    loss, metrics = L.cut(logp, judged, mask, threshold=3.0)
    np.testing.assert_allclose(float(loss[0]), -np.log(0.4), rtol=1e-12)
    assert float(metrics["cut/flagged"][0]) == 0.0


def test_cut_flagged_token_of_probability_one_stays_finite():
    with jax.enable_x64(False):
        logp = jnp.asarray([[0.0, -1e-9, -3.0]], jnp.float32)
        judged = logp + 1.0
        value, grad = jax.value_and_grad(lambda x: L.cut(x, judged, jnp.ones_like(x))[0].sum())(
            logp
        )
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
        np.testing.assert_allclose(
            float(value), (-np.log(1e-6) * 2 - np.log1p(-np.exp(-3.0))) / 3, rtol=1e-3
        )


def test_asft_is_absolute_likelihood_without_a_reconstruction_term():
    """The documented choice: sig(logodds(y)) = p, so loss = -(1 + lam) avg_w - lam log(1 -
    exp(avg_l)); each side scored alone (moving y_l leaves the y_w part unchanged)."""
    b = make_inputs("asft")
    avg_w = b["policy_chosen_logps"] / b["chosen_lengths"]
    avg_l = b["policy_rejected_logps"] / b["rejected_lengths"]
    loss, _ = jax_loss("asft", b, {"lam": 0.3})
    np.testing.assert_allclose(np.asarray(loss), -(1.3) * avg_w - 0.3 * log1mexp(avg_l), rtol=1e-12)
    assert not L.needs_reference("asft")


def test_asft_near_zero_average_logp_is_finite():
    with jax.enable_x64(False):
        x = jnp.asarray([-1e-7, -1e-3, -50.0], jnp.float32)
        one = jnp.ones(3)
        value, grads = jax.value_and_grad(lambda a, c: L.asft(a, c, one, one)[0].sum(), (0, 1))(
            x, x
        )
        assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in grads)


def test_aft_boundary_is_a_hinge_below_the_reference():
    """Negatives above ref_avg - margin: boundary 0, loss = log(1 + sum exp(s_n - s_p));
    a negative 2 nats/token below the reference with margin 0.5 adds 1.5."""
    pos = jnp.asarray([[-1.0, -2.0]])
    neg = jnp.asarray([[-3.0, -4.0]])
    ones = jnp.ones((1, 2))
    expected_rank = np.log(1 + np.exp(-2) + np.exp(-3) + np.exp(-1) + np.exp(-2))
    loss, metrics = L.aft(pos, neg, neg, ones, ones, margin=0.5)
    np.testing.assert_allclose(float(loss[0]), expected_rank, rtol=1e-12)
    assert float(metrics["aft/boundary"][0]) == 0.0 and float(metrics["aft/accuracy"][0]) == 1.0
    ref = neg.at[0, 0].set(-1.0)
    loss, metrics = L.aft(pos, neg, ref, ones, ones, margin=0.5)
    np.testing.assert_allclose(float(metrics["aft/boundary"][0]), 1.5 / 2, rtol=1e-12)
    np.testing.assert_allclose(float(loss[0]), expected_rank + 0.75, rtol=1e-12)


def test_aft_extreme_scores_stay_finite():
    with jax.enable_x64(False):
        pos = jnp.asarray([[-1e4, 0.0]], jnp.float32)
        neg = jnp.asarray([[0.0, -1e4, -1.0]], jnp.float32)
        value, grads = jax.value_and_grad(
            lambda p, n: L.aft(p, n, n, jnp.ones((1, 2)), jnp.ones((1, 3)))[0].sum(), (0, 1)
        )(pos, neg)
        assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in grads)


def test_realign_is_dpo_with_the_contrast_context_as_the_rejected_side():
    b = make_inputs("realign")
    loss, metrics = jax_loss("realign", b, {"beta": 0.2})
    as_dpo, _ = L.dpo(
        *(jnp.asarray(b[k]) for k in ("policy_chosen_logps", "policy_contrast_logps")),
        *(jnp.asarray(b[k]) for k in ("ref_chosen_logps", "ref_contrast_logps")),
        beta=0.2,
    )
    np.testing.assert_allclose(np.asarray(loss), np.asarray(as_dpo), rtol=1e-12)
    assert {"realign/chosen", "realign/contrast", "realign/accuracy", "realign/margin"} == set(
        metrics
    )


def test_bad_hyperparameters_raise():
    b = {k: jnp.asarray(v) for k, v in make_inputs("cut").items()}
    with pytest.raises(ValueError, match="threshold=0"):
        L.call("cut", b, threshold=0.0)
    a = {k: jnp.asarray(v) for k, v in make_inputs("aft").items()}
    with pytest.raises(ValueError, match="margin=-1"):
        L.call("aft", a, margin=-1.0)
