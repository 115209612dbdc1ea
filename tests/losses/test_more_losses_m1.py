"""D2O, PoFT and the GenARM reward-model loss against float64 NumPy written from METHODS.md:
values and gradients (central differences of the NumPy reference), and the choices the catalog
leaves open."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign.losses as L


def logsig(x):
    return -np.logaddexp(0.0, -x)


def np_genarm_bt(b, beta=1.0):
    return -logsig(beta * (b["policy_chosen_logps"] - b["policy_rejected_logps"]))


def finite_diff(f, b, key, h=1e-6):
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


def _check(name, b, hyper, ref, grad_keys):
    """Values (rtol 1e-10) and gradients (rtol 1e-6) of loss `name` against NumPy `ref`."""
    jb = {k: jnp.asarray(v) for k, v in b.items()}
    loss, metrics = L.call(name, jb, **hyper)
    assert loss.dtype == jnp.float64 and loss.shape == (len(next(iter(b.values()))),)
    np.testing.assert_allclose(np.asarray(loss), ref(b, **hyper), rtol=1e-10, atol=1e-12)
    grads = jax.grad(lambda xs: L.call(name, {**jb, **xs}, **hyper)[0].sum())(
        {k: jb[k] for k in grad_keys}
    )
    for key in grad_keys:
        expected = finite_diff(lambda bb: ref(bb, **hyper), b, key)
        np.testing.assert_allclose(
            np.asarray(grads[key]), expected, rtol=1e-6, atol=1e-8, err_msg=key
        )
    return metrics


# --------------------------------------------------------------------------------------------------
# GenARM: Bradley-Terry on the autoregressive reward r = sum_t log pi_r(y_t | x, y_<t).


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_genarm_bt_values_and_grads(beta):
    rng = np.random.default_rng(0)
    b = {
        "policy_chosen_logps": -rng.uniform(2.0, 40.0, 6),
        "policy_rejected_logps": -rng.uniform(2.0, 40.0, 6),
    }
    hyper = {} if beta == 1.0 else {"beta": beta}
    metrics = _check("genarm_bt", b, hyper, np_genarm_bt, list(b))
    np.testing.assert_allclose(
        np.asarray(metrics["rewards/chosen"]), beta * b["policy_chosen_logps"]
    )
    margin = beta * (b["policy_chosen_logps"] - b["policy_rejected_logps"])
    np.testing.assert_array_equal(np.asarray(metrics["rewards/accuracy"]), margin > 0)


def test_genarm_bt_is_reference_free_with_beta_r_one():
    """The choices: no reference model (only policy sums), beta_r defaults to 1."""
    assert L.required_inputs("genarm_bt") == ("policy_chosen_logps", "policy_rejected_logps")
    assert not L.needs_reference("genarm_bt")
    assert L.hyperparameters("genarm_bt") == {"beta": 1.0}


# --------------------------------------------------------------------------------------------------
# PoFT: -logsig(logp/|y| - aligned/|y|).


def np_poft(b):
    n = np.maximum(b["lengths"], 1.0)
    return -logsig(b["policy_logps"] / n - b["ref_logps"] / n)


def test_poft_values_and_grads():
    rng = np.random.default_rng(1)
    b = {
        "policy_logps": -rng.uniform(2.0, 60.0, 7),
        "ref_logps": -rng.uniform(2.0, 60.0, 7),
        "lengths": rng.integers(1, 30, 7).astype(np.float64),
    }
    metrics = _check("poft", b, {}, np_poft, ["policy_logps", "ref_logps"])
    score = b["policy_logps"] / b["lengths"]
    np.testing.assert_allclose(np.asarray(metrics["poft/score"]), score, rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(metrics["poft/aligned_score"]), b["ref_logps"] / b["lengths"], rtol=1e-12
    )


def test_poft_scores_are_length_normalised_with_no_temperature():
    """The choices: score = sum / |y| on both sides (a longer response with the same per-token
    log-probs scores the same), margin not scaled (no hyperparameters), aligned log-probs come in
    as the reference input (so `reference.soup` and `jaxalign cache-ref` supply them)."""
    assert L.hyperparameters("poft") == {}
    assert L.needs_reference("poft")
    per_token = {"policy_logps": np.array([-2.0]), "ref_logps": np.array([-3.0])}
    short = L.call("poft", {**per_token, "lengths": np.array([1.0])})[0]
    long_ = {k: v * 5 for k, v in per_token.items()} | {"lengths": np.array([5.0])}
    np.testing.assert_allclose(np.asarray(L.call("poft", long_)[0]), np.asarray(short))
    np.testing.assert_allclose(np.asarray(short), -logsig(1.0), rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# D2O: -logsig((beta/K) sum_i [logp(y_i) - ref(y_i)] - alpha [logp(y_l) - ref(y_l)]).


def np_d2o(b, beta=0.1, alpha=0.1):
    K = b["policy_samples_logps"].shape[1]
    samples = (b["policy_samples_logps"] - b["ref_samples_logps"]).sum(axis=1)
    rejected = b["policy_rejected_logps"] - b["ref_rejected_logps"]
    return -logsig(beta / K * samples - alpha * rejected)


def _d2o_inputs(batch, K, seed=2):
    rng = np.random.default_rng(seed)
    policy = -rng.uniform(2.0, 40.0, (batch, 1 + K))
    ref = policy + rng.normal(0.0, 3.0, (batch, 1 + K))
    return {
        "policy_rejected_logps": policy[:, 0],
        "ref_rejected_logps": ref[:, 0],
        "policy_samples_logps": policy[:, 1:].copy(),
        "ref_samples_logps": ref[:, 1:].copy(),
    }


@pytest.mark.parametrize(("K", "hyper"), [(2, {}), (3, {"beta": 0.5, "alpha": 0.05}), (1, {})])
def test_d2o_values_and_grads(K, hyper):
    b = _d2o_inputs(6, K)
    metrics = _check("d2o", b, hyper, np_d2o, list(b))
    beta = hyper.get("beta", 0.1)
    s = (b["policy_samples_logps"] - b["ref_samples_logps"]).mean(axis=1)
    np.testing.assert_allclose(np.asarray(metrics["rewards/samples"]), beta * s, rtol=1e-12)


def test_d2o_defaults_and_k_of_one_is_dpo():
    """The choices: alpha = beta = 0.1, one reference for ref_minus and ref_plus; with K = 1 and
    alpha = beta, D2O is DPO with the sample as the chosen response."""
    assert L.hyperparameters("d2o") == {"beta": 0.1, "alpha": 0.1}
    assert L.needs_reference("d2o")
    b = _d2o_inputs(5, 1, seed=3)
    d2o, _ = L.call("d2o", {k: jnp.asarray(v) for k, v in b.items()}, beta=0.3, alpha=0.3)
    pair = {
        "policy_chosen_logps": b["policy_samples_logps"][:, 0],
        "ref_chosen_logps": b["ref_samples_logps"][:, 0],
        "policy_rejected_logps": b["policy_rejected_logps"],
        "ref_rejected_logps": b["ref_rejected_logps"],
    }
    dpo, _ = L.call("dpo", {k: jnp.asarray(v) for k, v in pair.items()}, beta=0.3)
    np.testing.assert_allclose(np.asarray(d2o), np.asarray(dpo), rtol=1e-12)
