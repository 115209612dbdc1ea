"""Losses against independent float64 NumPy implementations written from METHODS.md (values and
gradients), edge cases (equal log-probs, extreme margins, batch of one) and the registry / loss
mixes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign.losses as L

# --------------------------------------------------------------------------------------------------
# NumPy references, one per METHODS.md row.


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return np.exp(logsig(x))


def _pair(b):
    s_w = b["policy_chosen_logps"] - b["ref_chosen_logps"]
    s_l = b["policy_rejected_logps"] - b["ref_rejected_logps"]
    return s_w, s_l


def np_dpo(b, beta=0.1, label_smoothing=0.0):
    s_w, s_l = _pair(b)
    z = beta * (s_w - s_l)
    return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)


def np_robust(b, beta=0.1, label_smoothing=0.0):
    s_w, s_l = _pair(b)
    z = beta * (s_w - s_l)
    eps = label_smoothing
    return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)


def np_hinge(b, beta=0.1):
    s_w, s_l = _pair(b)
    return np.maximum(0.0, 1 - beta * (s_w - s_l))


def np_ipo(b, beta=0.1):
    s_w, s_l = _pair(b)
    d_avg = s_w / b["chosen_lengths"] - s_l / b["rejected_lengths"]
    return (d_avg - 1 / (2 * beta)) ** 2


def np_exo_pair(b, beta=0.1, label_smoothing=1e-3):
    s_w, s_l = _pair(b)
    z = beta * (s_w - s_l)
    eps = label_smoothing
    return sig(z) * (logsig(z) - np.log(1 - eps)) + sig(-z) * (logsig(-z) - np.log(eps))


def np_nca_pair(b, beta=0.1):
    s_w, s_l = _pair(b)
    return -logsig(beta * s_w) - 0.5 * logsig(-beta * s_w) - 0.5 * logsig(-beta * s_l)


def np_bco_pair(b, beta=0.1):
    s_w, s_l = _pair(b)
    delta = b.get("delta", 0.0)
    return -logsig(beta * s_w - delta) - logsig(-(beta * s_l - delta))


def np_sppo_hard(b, beta=0.1):
    s_w, s_l = _pair(b)
    return (s_w - 1 / (2 * beta)) ** 2 + (s_l + 1 / (2 * beta)) ** 2


def np_apo_zero(b, beta=0.1):
    s_w, s_l = _pair(b)
    return (1 - sig(beta * s_w)) + sig(beta * s_l)


def np_apo_down(b, beta=0.1):
    s_w, s_l = _pair(b)
    return sig(beta * s_w) + (1 - sig(beta * (s_w - s_l)))


def np_sigmoid_norm(b, beta=0.1):
    s_w, s_l = _pair(b)
    return -logsig(beta * (s_w / b["chosen_lengths"] - s_l / b["rejected_lengths"]))


def np_rpo(b, beta=0.1, label_smoothing=0.0, alpha=1.0):
    nll = -b["policy_chosen_logps"] / b["chosen_lengths"]
    return np_dpo(b, beta, label_smoothing) + alpha * nll


def np_ld_dpo(b, beta=0.1, alpha=0.5, label_smoothing=0.0):
    ld = {}
    for side in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"):
        full, prefix = b[f"{side}_logps"], b[f"{side}_prefix_logps"]
        ld[f"{side}_logps"] = prefix + alpha * (full - prefix)
    return np_dpo(ld, beta, label_smoothing)


def np_modpo(b, weights, beta=0.1):
    w = np.asarray(weights, dtype=np.float64)
    s_w, s_l = _pair(b)
    g_w = (beta * s_w - b["chosen_margins"] @ w[1:]) / w[0]
    g_l = (beta * s_l - b["rejected_margins"] @ w[1:]) / w[0]
    return -logsig(g_w - g_l)


def np_simpo(b, beta=2.0, gamma=None, gamma_beta_ratio=0.5):
    gamma = gamma_beta_ratio * beta if gamma is None else gamma
    avg_w = b["policy_chosen_logps"] / b["chosen_lengths"]
    avg_l = b["policy_rejected_logps"] / b["rejected_lengths"]
    return -logsig(beta * (avg_w - avg_l) - gamma)


def np_cpo(b, beta=0.1, label_smoothing=0.0, alpha=1.0):
    z = beta * (b["policy_chosen_logps"] - b["policy_rejected_logps"])
    nll = -b["policy_chosen_logps"] / b["chosen_lengths"]
    return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z) + alpha * nll


def np_orpo(b, lam=0.1):
    avg_w = b["policy_chosen_logps"] / b["chosen_lengths"]
    avg_l = b["policy_rejected_logps"] / b["rejected_lengths"]
    log_odds = (avg_w - avg_l) - (np.log(-np.expm1(avg_w)) - np.log(-np.expm1(avg_l)))
    return -avg_w - lam * logsig(log_odds)


def np_kto(b, beta=0.1, lam_d=1.0, lam_u=1.0):
    kl = b["kl_policy_logps"] - b["kl_ref_logps"]
    mask = b.get("example_mask")
    mean_kl = kl.mean() if mask is None else (kl * mask).sum() / mask.sum()
    z0 = max(0.0, mean_kl)
    s = b["policy_logps"] - b["ref_logps"]
    return np.where(
        b["labels"] > 0.5, lam_d * (1 - sig(beta * (s - z0))), lam_u * (1 - sig(beta * (z0 - s)))
    )


def np_bco(b, beta=0.1):
    r = beta * (b["policy_logps"] - b["ref_logps"])
    delta = b.get("delta", 0.0)
    w = np.clip(b["density_ratio"], 0.5, 10.0) if "density_ratio" in b else 1.0
    return np.where(b["labels"] > 0.5, -logsig(r - delta), -w * logsig(-(r - delta)))


def np_npo(b, beta=0.1):
    return -(2 / beta) * logsig(-beta * (b["policy_logps"] - b["ref_logps"]))


def np_sft(b):
    return -b["policy_logps"] / b["lengths"]


def np_bradley_terry(b, center_coef=0.0):
    r_w, r_l = b["chosen_rewards"], b["rejected_rewards"]
    margin = b.get("margin", 0.0)
    return -logsig(r_w - r_l - margin) + center_coef * (r_w + r_l) ** 2


def np_discopop(b, beta=0.1, tau=0.05):
    s_w, s_l = _pair(b)
    z = beta * (s_w - s_l)
    m = sig(z / tau)
    return (1 - m) * (-logsig(z)) + m * np.exp(-z)


def np_aot(b, beta=0.1, label_smoothing=0.0):
    d = np.sort(b["policy_chosen_logps"] - b["policy_rejected_logps"]) - np.sort(
        b["ref_chosen_logps"] - b["ref_rejected_logps"]
    )
    z = beta * d
    return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)


def np_aot_unpaired(b, beta=0.1, label_smoothing=0.0):
    s_w, s_l = _pair(b)
    z = beta * (np.sort(s_w) - np.sort(s_l))
    return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)


def np_f_dpo(b, beta=0.1, label_smoothing=0.0, divergence="reverse_kl", f_alpha=0.5):
    f = {
        "reverse_kl": lambda s: s,
        "forward_kl": lambda s: 1 - np.exp(-s),
        "js": lambda s: np.log(2) + logsig(s),
        "alpha": lambda s: (np.exp((f_alpha - 1) * s) - 1) / (f_alpha - 1),
    }[divergence]
    s_w, s_l = _pair(b)
    z = beta * (f(s_w) - f(s_l))
    return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)


def np_mm_dpo(b, beta=0.1, w=0.1, label_smoothing=0.0):
    s_w, s_l = _pair(b)
    z = beta * (1 + w * b["beta_feature"]) * (s_w - s_l)
    return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)


def np_logo(b, beta=2.0, gamma=1.0, lam=0.1):
    avg_w = b["policy_chosen_logps"] / b["chosen_lengths"]
    avg_l = b["policy_rejected_logps"] / b["rejected_lengths"]  # [B, M]
    return -logsig(beta * avg_w - beta * avg_l.mean(-1) - gamma) - lam * avg_w


def np_lsc_transform(r, r_ref):
    return logsig(r - r_ref)


# --------------------------------------------------------------------------------------------------
# Cases: loss name, hyperparameters, NumPy reference. Gradients are checked for every input not in
# NO_GRAD (data fields, stop-gradient inputs).

PAIR = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
LENGTHS = ("chosen_lengths", "rejected_lengths")
PREFIX = tuple(k.replace("_logps", "_prefix_logps") for k in PAIR)
NO_GRAD = {
    "labels",
    "example_mask",
    "delta",
    "density_ratio",
    "kl_policy_logps",
    "kl_ref_logps",
    "chosen_lengths",
    "rejected_lengths",
    "lengths",
    "margin",
}

CASES = [
    ("dpo", {}, np_dpo),
    ("dpo", {"beta": 0.3, "label_smoothing": 0.2}, np_dpo),
    ("robust", {"label_smoothing": 0.1}, np_robust),
    ("hinge", {"beta": 0.05}, np_hinge),
    ("ipo", {"beta": 0.2}, np_ipo),
    ("exo_pair", {}, np_exo_pair),
    ("exo_pair", {"beta": 0.3, "label_smoothing": 0.1}, np_exo_pair),
    ("nca_pair", {}, np_nca_pair),
    ("bco_pair", {}, np_bco_pair),
    ("sppo_hard", {"beta": 0.5}, np_sppo_hard),
    ("apo_zero", {}, np_apo_zero),
    ("apo_down", {}, np_apo_down),
    ("sigmoid_norm", {"beta": 0.5}, np_sigmoid_norm),
    ("rpo", {"alpha": 0.7, "label_smoothing": 0.1}, np_rpo),
    ("ld_dpo", {"alpha": 0.3}, np_ld_dpo),
    ("modpo", {"weights": (0.6, 0.3, 0.1), "beta": 0.2}, np_modpo),
    ("simpo", {}, np_simpo),
    ("simpo", {"beta": 2.5, "gamma": 0.3}, np_simpo),
    ("cpo", {"alpha": 0.5, "label_smoothing": 0.1}, np_cpo),
    ("orpo", {"lam": 0.2}, np_orpo),
    ("kto", {"lam_d": 1.3, "lam_u": 0.7}, np_kto),
    ("bco", {}, np_bco),
    ("npo", {"beta": 0.2}, np_npo),
    ("sft", {}, np_sft),
    ("bradley_terry", {"center_coef": 0.01}, np_bradley_terry),
    ("discopop", {"beta": 0.05}, np_discopop),
    ("aot", {"label_smoothing": 0.1}, np_aot),
    ("aot_unpaired", {}, np_aot_unpaired),
    ("f_dpo", {}, np_f_dpo),
    ("f_dpo", {"divergence": "forward_kl", "beta": 0.01}, np_f_dpo),
    ("f_dpo", {"divergence": "js"}, np_f_dpo),
    ("f_dpo", {"divergence": "alpha", "f_alpha": 0.9}, np_f_dpo),
    ("mm_dpo", {"w": 0.5}, np_mm_dpo),
    ("logo", {}, np_logo),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]


def make_inputs(name, batch=5, seed=0, kl_offset=0.5):
    """Random float64 inputs for every input the loss accepts (optional ones included)."""
    rng = np.random.default_rng(seed)
    b = {}
    for key in L.inputs(name):
        if key.endswith("_logps") and not key.startswith("kl_"):
            b[key] = -rng.uniform(5.0, 60.0, batch)
        elif key in (*LENGTHS, "lengths"):
            b[key] = rng.integers(1, 40, batch).astype(np.float64)
        elif key == "labels":
            b[key] = (np.arange(batch) % 2 == 0).astype(np.float64)
        elif key == "delta":
            b[key] = np.float64(0.3)
        elif key == "density_ratio":
            b[key] = rng.uniform(0.2, 12.0, batch)
        elif key.endswith("_margins"):
            b[key] = rng.normal(size=(batch, 2))
        elif key.endswith("_rewards"):
            b[key] = 2.0 * rng.normal(size=batch)
        elif key == "margin":
            b[key] = rng.uniform(0.0, 1.0, batch)
        elif key == "example_mask":
            b[key] = np.ones(batch)
        elif key == "beta_feature":
            b[key] = rng.normal(size=batch)
    if name == "f_dpo":  # log-ratios of a few nats, where exp(-s) is well conditioned
        for side in ("chosen", "rejected"):
            b[f"ref_{side}_logps"] = b[f"policy_{side}_logps"] + rng.normal(0.0, 2.0, batch)
    if name == "logo":  # M = 3 rejected responses per prompt
        b["policy_rejected_logps"] = -rng.uniform(5.0, 60.0, (batch, 3))
        b["rejected_lengths"] = rng.integers(1, 40, (batch, 3)).astype(np.float64)
    if "kl_policy_logps" in b or name == "kto":
        b["kl_policy_logps"] = -rng.uniform(5.0, 60.0, batch)
        b["kl_ref_logps"] = b["kl_policy_logps"] - kl_offset - rng.normal(size=batch)
    return b


def jax_loss(name, b, hyper):
    return L.call(name, {k: jnp.asarray(v) for k, v in b.items()}, **hyper)


def finite_diff(f, b, key, h=1e-5):
    """Central differences of sum(f(b)) with respect to b[key], float64."""
    grad = np.zeros_like(b[key])
    for idx in np.ndindex(b[key].shape):
        plus, minus = dict(b), dict(b)
        plus[key], minus[key] = b[key].copy(), b[key].copy()
        plus[key][idx] += h
        minus[key][idx] -= h
        grad[idx] = (f(plus).sum() - f(minus).sum()) / (2 * h)
    return grad


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize(("name", "hyper", "ref"), CASES, ids=IDS)
def test_values_and_grads_match_numpy(name, hyper, ref):
    b = make_inputs(name, batch=5)
    loss, metrics = jax_loss(name, b, hyper)
    assert loss.shape == (5,) and loss.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(loss), ref(b, **hyper), rtol=1e-10, atol=1e-12)
    for key, value in metrics.items():
        assert value.shape in ((5,), ()), key

    keys = [k for k in b if k not in NO_GRAD]
    grads = jax.grad(lambda xs: jax_loss(name, {**b, **xs}, hyper)[0].sum())(
        {k: jnp.asarray(b[k]) for k in keys}
    )
    for key in keys:
        expected = finite_diff(lambda bb: ref(bb, **hyper), b, key)
        np.testing.assert_allclose(
            np.asarray(grads[key]), expected, rtol=1e-6, atol=1e-8, err_msg=key
        )


@pytest.mark.parametrize(("name", "hyper", "ref"), CASES, ids=IDS)
def test_batch_of_one(name, hyper, ref):
    b = make_inputs(name, batch=1, seed=1)
    loss, metrics = jax_loss(name, b, hyper)
    assert loss.shape == (1,)
    np.testing.assert_allclose(np.asarray(loss), ref(b, **hyper), rtol=1e-10, atol=1e-12)
    assert all(v.shape in ((1,), ()) for v in metrics.values())


@pytest.mark.parametrize(("name", "hyper", "ref"), CASES, ids=IDS)
def test_equal_logps(name, hyper, ref):
    """Chosen, rejected, policy and reference all equal: finite and matching NumPy."""
    b = make_inputs(name, batch=3)
    for key in b:
        if key.endswith("_logps") and not key.startswith("kl_"):
            b[key] = np.full_like(b[key], -12.0)
    for key in ("chosen_lengths", "rejected_lengths"):
        if key in b:
            b[key] = np.full_like(b[key], 6.0)
    loss, _ = jax_loss(name, b, hyper)
    np.testing.assert_allclose(np.asarray(loss), ref(b, **hyper), rtol=1e-10, atol=1e-12)


def test_dpo_at_zero_delta_is_log2():
    b = make_inputs("dpo", batch=2)
    b["policy_rejected_logps"] = b["policy_chosen_logps"]
    b["ref_rejected_logps"] = b["ref_chosen_logps"]
    loss, metrics = jax_loss("dpo", b, {"label_smoothing": 0.3})
    np.testing.assert_allclose(np.asarray(loss), np.log(2.0), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(metrics["rewards/accuracy"]), 0.0)


def test_zero_label_smoothing():
    b = make_inputs("dpo", batch=4)
    plain = np_dpo(b)
    s_w = b["policy_chosen_logps"] - b["ref_chosen_logps"]
    s_l = b["policy_rejected_logps"] - b["ref_rejected_logps"]
    np.testing.assert_allclose(plain, -logsig(0.1 * (s_w - s_l)), rtol=1e-12)
    for name in ("dpo", "robust"):
        loss, _ = jax_loss(name, b, {"label_smoothing": 0.0})
        np.testing.assert_allclose(np.asarray(loss), plain, rtol=1e-10)
    loss, _ = jax_loss("cpo", make_inputs("cpo", batch=4), {"label_smoothing": 0.0, "alpha": 0.0})
    c = make_inputs("cpo", batch=4)
    np.testing.assert_allclose(
        np.asarray(loss), -logsig(0.1 * (c["policy_chosen_logps"] - c["policy_rejected_logps"]))
    )


@pytest.mark.parametrize(("name", "hyper", "ref"), CASES, ids=IDS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_margins_stay_finite(name, hyper, ref, sign):
    """Margins of +-1e4 nats (float32, the training dtype): values and gradients stay finite."""
    with jax.enable_x64(False):
        b = make_inputs(name, batch=3)
        big = 1e4 * sign
        if name in ("orpo", "simpo", "cpo", "logo"):
            # reference-free: log-probs stay negative; the chosen average is near 0 or very negative
            near, far = (-1e-3, -1e4) if sign > 0 else (-1e4, -1e-3)
            b["policy_chosen_logps"] = np.full(3, near)
            b["policy_rejected_logps"] = np.full(b["policy_rejected_logps"].shape, far)
        elif "policy_chosen_logps" in b:
            b["policy_rejected_logps"] = b["policy_chosen_logps"] - big
        if "policy_logps" in b:
            b["policy_logps"] = b.get("ref_logps", np.zeros(3)) + big
        if "chosen_rewards" in b:
            b["chosen_rewards"] = b["rejected_rewards"] + big
        inputs = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in b.items()}
        keys = [k for k in b if k not in NO_GRAD]

        def total(xs):
            loss, _ = L.call(name, {**inputs, **xs}, **hyper)
            return loss.sum()

        value, grads = jax.value_and_grad(total)({k: inputs[k] for k in keys})
        assert np.isfinite(float(value)), name
        for key in keys:
            assert np.all(np.isfinite(np.asarray(grads[key]))), (name, key)


# --------------------------------------------------------------------------------------------------
# Documented choices pinned.


def test_simpo_default_gamma_is_half_beta():
    b = make_inputs("simpo", batch=3)
    loss, _ = jax_loss("simpo", b, {"beta": 3.0})
    explicit, _ = jax_loss("simpo", b, {"beta": 3.0, "gamma": 1.5})
    np.testing.assert_allclose(np.asarray(loss), np.asarray(explicit), rtol=1e-12)


def test_ld_dpo_alpha_one_is_dpo():
    b = make_inputs("ld_dpo", batch=4)
    loss, _ = jax_loss("ld_dpo", b, {"alpha": 1.0})
    np.testing.assert_allclose(np.asarray(loss), np_dpo(b), rtol=1e-10)


def test_rpo_is_dpo_plus_token_mean_nll():
    b = make_inputs("rpo", batch=4)
    loss, metrics = jax_loss("rpo", b, {"alpha": 2.0})
    nll = -b["policy_chosen_logps"] / b["chosen_lengths"]
    np.testing.assert_allclose(np.asarray(loss), np_dpo(b) + 2.0 * nll, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(metrics["nll/chosen"]), nll, rtol=1e-10)


def test_kto_z0_is_clipped_and_stop_gradient():
    b = make_inputs("kto", batch=4, kl_offset=-5.0)  # mean KL estimate < 0: z0 = 0
    loss, metrics = jax_loss("kto", b, {})
    assert float(metrics["kl"]) == 0.0
    np.testing.assert_allclose(np.asarray(loss), np_kto(b), rtol=1e-10)
    b = make_inputs("kto", batch=4, kl_offset=5.0)
    grads = jax.grad(lambda kl: jax_loss("kto", {**b, "kl_policy_logps": kl}, {})[0].sum())(
        jnp.asarray(b["kl_policy_logps"])
    )
    np.testing.assert_array_equal(np.asarray(grads), 0.0)


def test_kto_example_mask_excludes_padding_from_z0():
    b = make_inputs("kto", batch=4, kl_offset=2.0)
    b["example_mask"] = np.array([1.0, 1.0, 1.0, 0.0])
    b["kl_policy_logps"][3] = 1e3  # padding row: must not move z0
    loss, _ = jax_loss("kto", b, {})
    np.testing.assert_allclose(np.asarray(loss), np_kto(b), rtol=1e-10)


def test_bco_delta_statistics():
    b = make_inputs("bco_pair", batch=4)
    _, metrics = jax_loss("bco_pair", b, {"beta": 0.2})
    s_w = b["policy_chosen_logps"] - b["ref_chosen_logps"]
    s_l = b["policy_rejected_logps"] - b["ref_rejected_logps"]
    np.testing.assert_allclose(
        float(metrics["delta/batch_reward"].mean()),
        np.mean(np.r_[0.2 * s_w, 0.2 * s_l]),
        rtol=1e-10,
    )
    u = make_inputs("bco", batch=4)
    _, metrics = jax_loss("bco", u, {})
    np.testing.assert_allclose(
        np.asarray(metrics["delta/batch_reward"]), 0.1 * (u["policy_logps"] - u["ref_logps"])
    )


def test_bco_density_ratio_only_weights_undesirable_and_is_clipped():
    u = make_inputs("bco", batch=4)
    u["density_ratio"] = np.array([100.0, 100.0, 0.01, 0.01])
    without = dict(u)
    del without["density_ratio"]
    loss, _ = jax_loss("bco", u, {})
    base, _ = jax_loss("bco", without, {})
    np.testing.assert_allclose(np.asarray(loss), np.asarray(base) * np.array([1.0, 10.0, 1.0, 0.5]))


def test_bradley_terry_margin_and_centering():
    b = make_inputs("bradley_terry", batch=4)
    loss, metrics = jax_loss("bradley_terry", b, {"center_coef": 0.0})
    expected = -logsig(b["chosen_rewards"] - b["rejected_rewards"] - b["margin"])
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-10)
    no_margin = {k: v for k, v in b.items() if k != "margin"}
    loss, _ = jax_loss("bradley_terry", no_margin, {})
    np.testing.assert_allclose(
        np.asarray(loss), -logsig(b["chosen_rewards"] - b["rejected_rewards"]), rtol=1e-10
    )
    expected = (b["chosen_rewards"] > b["rejected_rewards"]).astype(float)
    np.testing.assert_array_equal(np.asarray(metrics["rewards/accuracy"]), expected)


def test_f_dpo_reverse_kl_is_dpo_and_alpha_tends_to_it():
    b = make_inputs("dpo", batch=4)
    loss, _ = jax_loss("f_dpo", b, {"label_smoothing": 0.1})
    np.testing.assert_allclose(np.asarray(loss), np_dpo(b, label_smoothing=0.1), rtol=1e-10)
    loss, _ = jax_loss("f_dpo", b, {"divergence": "alpha", "f_alpha": 1.0 - 1e-7})
    np.testing.assert_allclose(np.asarray(loss), np_dpo(b), rtol=1e-5)
    with pytest.raises(ValueError, match="divergence"):
        jax_loss("f_dpo", b, {"divergence": "hellinger"})


def test_aot_sorts_over_the_batch():
    b = make_inputs("aot", batch=4)
    perm = np.array([2, 0, 3, 1])
    shuffled = {k: v[perm] for k, v in b.items()}
    loss, _ = jax_loss("aot", b, {})
    loss_shuffled, _ = jax_loss("aot", shuffled, {})
    np.testing.assert_allclose(np.asarray(loss), np.asarray(loss_shuffled), rtol=1e-12)


def test_wpo_weights():
    rng = np.random.default_rng(7)
    shape = (3, 6)
    logps_w, logps_l = -rng.uniform(0.1, 5.0, shape), -rng.uniform(0.1, 5.0, shape)
    sq_w, sq_l = rng.uniform(0.05, 1.0, shape), rng.uniform(0.05, 1.0, shape)
    mask_w = (np.arange(6) < np.array([[6], [3], [1]])).astype(float)
    mask_l = (np.arange(6) < np.array([[2], [6], [4]])).astype(float)

    def side(lp, sq, m):
        return np.array([np.mean((lp[i] - np.log(sq[i]))[m[i] > 0]) for i in range(3)])

    expected = np.exp(side(logps_w, sq_w, mask_w) + side(logps_l, sq_l, mask_l))
    args = [jnp.asarray(a) for a in (logps_w, sq_w, mask_w, logps_l, sq_l, mask_l)]
    np.testing.assert_allclose(np.asarray(L.wpo_weights(*args)), expected, rtol=1e-10)
    grad = jax.grad(lambda x: L.wpo_weights(x, *args[1:]).sum())(args[0])
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_lsc_transform_and_combine():
    rng = np.random.default_rng(3)
    r, r_ref = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    np.testing.assert_allclose(
        np.asarray(L.lsc_transform(jnp.asarray(r), jnp.asarray(r_ref))), np_lsc_transform(r, r_ref)
    )
    np.testing.assert_allclose(
        np.asarray(L.lsc_combine(jnp.asarray(r), jnp.asarray(r_ref))),
        np_lsc_transform(r, r_ref).sum(-1),
    )
    assert np.isfinite(float(L.lsc_transform(jnp.asarray(-1e4), jnp.asarray(1e4))))


def test_orpo_near_zero_average_logp_is_finite():
    b = make_inputs("orpo", batch=2)
    b["policy_chosen_logps"] = np.array([-1e-9, -1e-7])
    b["chosen_lengths"] = np.array([1.0, 3.0])
    loss, _ = jax_loss("orpo", b, {})
    np.testing.assert_allclose(np.asarray(loss), np_orpo(b), rtol=1e-8)


def test_invalid_hyperparameters():
    b = {k: jnp.zeros(2) for k in PAIR}
    with pytest.raises(ValueError, match="label_smoothing"):
        L.call("robust", b, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.call("exo_pair", b, label_smoothing=0.0)
    with pytest.raises(ValueError, match="weights"):
        L.call(
            "modpo",
            {**b, "chosen_margins": jnp.zeros((2, 2)), "rejected_margins": jnp.zeros((2, 2))},
            weights=(1.0, 0.5),
        )


def test_jit():
    b = {k: jnp.asarray(v) for k, v in make_inputs("ipo", batch=3).items()}
    loss = jax.jit(lambda bb: L.call("ipo", bb, beta=0.2)[0])(b)
    np.testing.assert_allclose(np.asarray(loss), np_ipo(make_inputs("ipo", batch=3), beta=0.2))


# --------------------------------------------------------------------------------------------------
# Registry and mixes.


def test_registry_names_and_signatures():
    # Losses of later catalog rows are tested in their own files (tests/losses/test_more_*.py).
    assert {name for name, _, _ in CASES} <= set(L.names())
    assert L.get("dpo") is L.dpo
    assert L.required_inputs("dpo") == PAIR
    assert L.required_inputs("ipo") == PAIR + LENGTHS
    assert L.required_inputs("sft") == ("policy_logps", "lengths")
    assert "example_mask" in L.inputs("kto") and "example_mask" not in L.required_inputs("kto")
    assert L.hyperparameters("simpo")["beta"] == 2.0
    reference_free = {n for n, _, _ in CASES if not L.needs_reference(n)}
    assert reference_free == {"simpo", "cpo", "orpo", "logo", "sft", "bradley_terry"}


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="did you mean 'dpo'.*known losses: .*aot, "):
        L.get("dpoo")
    with pytest.raises(KeyError, match="unknown loss"):
        L.mix([("nope", 1.0)])


def test_call_passes_inputs_by_name_and_checks():
    b = make_inputs("dpo", batch=3)
    extra = {**b, "chosen_lengths": np.ones(3), "unused": np.ones(3)}
    loss, _ = jax_loss("dpo", extra, {"beta": 0.2})
    np.testing.assert_allclose(np.asarray(loss), np_dpo(b, beta=0.2), rtol=1e-10)
    with pytest.raises(KeyError, match="needs inputs \\['ref_rejected_logps'\\]"):
        L.call("dpo", {k: v for k, v in b.items() if k != "ref_rejected_logps"})
    with pytest.raises(TypeError, match="unknown hyperparameters \\['betta'\\]"):
        L.call("dpo", b, betta=0.1)
    with pytest.raises(TypeError, match="needs hyperparameters \\['weights'\\]"):
        L.bind("modpo")


def test_mix_is_weighted_sum_of_means_with_prefixed_metrics():
    b = {**make_inputs("dpo", batch=4), "chosen_lengths": np.array([3.0, 5.0, 8.0, 2.0])}
    fn = L.mix([("dpo", 0.8, {"beta": 0.2}), ("bco_pair", 0.2), ("sft", 1.0)])
    assert fn.needs_reference and fn.labels == ("dpo", "bco_pair", "sft")
    loss, metrics = fn({k: jnp.asarray(v) for k, v in b.items()})
    sft_chosen = -b["policy_chosen_logps"] / b["chosen_lengths"]  # sft sees the chosen side
    expected = 0.8 * np_dpo(b, beta=0.2).mean() + 0.2 * np_bco_pair(b).mean() + sft_chosen.mean()
    np.testing.assert_allclose(float(loss.mean()), expected, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(metrics["sft/loss"]), sft_chosen, rtol=1e-10)
    assert {"dpo/rewards/accuracy", "bco_pair/delta/batch_reward", "sft/nll"} <= set(metrics)


def test_mix_rename_and_duplicate_labels():
    b = make_inputs("npo", batch=3)
    b |= {"retain_logps": -np.array([4.0, 6.0, 9.0]), "retain_lengths": np.array([2.0, 3.0, 3.0])}
    fn = L.mix(
        [
            ("npo", 1.0),
            ("sft", 0.5, {}, {"policy_logps": "retain_logps", "lengths": "retain_lengths"}),
            ("npo", 2.0, {"beta": 0.5}),
        ]
    )
    assert fn.labels == ("npo#0", "sft", "npo#2")
    assert fn.required_inputs == ("policy_logps", "ref_logps", "retain_logps", "retain_lengths")
    loss, metrics = fn({k: jnp.asarray(v) for k, v in b.items()})
    expected = np_npo(b) + 0.5 * np.array([2.0, 2.0, 3.0]) + 2.0 * np_npo(b, beta=0.5)
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-10)
    assert "npo#2/rewards/reward" in metrics
    with pytest.raises(TypeError, match="no inputs"):
        L.mix([("sft", 1.0, {}, {"logps": "retain_logps"})])
