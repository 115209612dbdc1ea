"""token_jsd (generalised Jensen-Shannon divergence, GKD) against float64 NumPy written from the
math, the blocked XLA path against the reference, the end points against the KLs, and the
blocked path's jaxpr never holding an [N, V] array."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.kernels import token_jsd, token_kl

V = 37  # not a multiple of the block
BLOCK = 16


def _inputs(seed, lead=(2, 3), ds=8, dt=12, vocab=V, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 5)
    hs = jax.random.normal(k[0], (*lead, ds), jnp.float32).astype(dtype)
    ws = (jax.random.normal(k[1], (ds, vocab), jnp.float32) * 0.6).astype(dtype)
    ht = jax.random.normal(k[2], (*lead, dt), jnp.float32).astype(dtype)  # another width
    wt = (jax.random.normal(k[3], (dt, vocab), jnp.float32) * 0.6).astype(dtype)
    g = jax.random.normal(k[4], lead, jnp.float32)
    return hs, ws, ht, wt, g


def _np_jsd(hs, ws, ht, wt, beta, tau):
    """JSD_b per token in float64 from the definition (METHODS.md section 10; end points as
    TRL's generalized_jsd_loss: b=0 KL(p_T || p_S), b=1 KL(p_S || p_T))."""

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ls, lt = log_softmax(hs @ ws / tau), log_softmax(ht @ wt / tau)
    ps, pt = np.exp(ls), np.exp(lt)
    if beta == 0.0:
        return (pt * (lt - ls)).sum(-1)
    if beta == 1.0:
        return (ps * (ls - lt)).sum(-1)
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * (lt - np.log(m))).sum(-1) + (1 - beta) * (ps * (ls - np.log(m))).sum(-1)


def _value_and_grads(impl, hs, ws, ht, wt, g, **kw):
    def loss(*args):
        out = token_jsd(*args, implementation=impl, block_size=BLOCK, **kw)
        return jnp.sum(out * g), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(hs, ws, ht, wt)


BETAS = [0.0, 0.3, 1.0]  # the two end points (special-cased) and the mixture


@pytest.mark.parametrize("beta", BETAS)
def test_reference_matches_numpy_values_and_finite_difference_grads(beta):
    """Values from the definition; d(sum_i g_i JSD_i) / d(h_S, W_S) by central differences of the
    NumPy function (step 1e-6, float64); the teacher gets no gradient."""
    tau = 1.7
    hs, ws, ht, wt, g = _inputs(0)
    (_, got), (dhs, dws, dht, dwt) = _value_and_grads(
        "reference", hs, ws, ht, wt, g, beta=beta, temperature=tau
    )
    hs64, ht64 = (np.asarray(x, np.float64).reshape(-1, x.shape[-1]) for x in (hs, ht))
    ws64, wt64, g64 = (np.asarray(x, np.float64) for x in (ws, wt, g.reshape(-1)))
    want = _np_jsd(hs64, ws64, ht64, wt64, beta, tau)
    np.testing.assert_allclose(np.asarray(got).reshape(-1), want, rtol=0, atol=2e-6)

    def total(h, w):
        return float(g64 @ _np_jsd(h, w, ht64, wt64, beta, tau))

    def fd(x, f):
        grad = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            up, down = x.copy(), x.copy()
            up[i] += 1e-6
            down[i] -= 1e-6
            grad[i] = (f(up) - f(down)) / 2e-6
        return grad

    np.testing.assert_allclose(
        np.reshape(dhs, hs64.shape), fd(hs64, lambda h: total(h, ws64)), rtol=0, atol=2e-5
    )
    np.testing.assert_allclose(dws, fd(ws64, lambda w: total(hs64, w)), rtol=0, atol=2e-5)
    assert not np.any(np.asarray(dht)) and not np.any(np.asarray(dwt))


@pytest.mark.parametrize(
    "beta,dtype,vtol,gtol",
    [*((b, jnp.float32, 2e-5, 2e-5) for b in BETAS), (0.3, jnp.bfloat16, 2e-3, 2e-2)],
)
def test_xla_matches_reference(beta, dtype, vtol, gtol):
    """Tolerances as in test_kl.py (bf16: different summation order, bf16 gradients)."""
    args = _inputs(1, dtype=dtype)
    mask = jnp.ones(args[-1].shape, bool).at[1, 2].set(False)
    kw = dict(beta=beta, temperature=0.8, mask=mask)
    (_, want), want_g = _value_and_grads("reference", *args, **kw)
    (_, got), got_g = _value_and_grads("xla", *args, **kw)
    np.testing.assert_allclose(got, want, rtol=0, atol=vtol)
    for a, b in zip(got_g, want_g, strict=True):
        scale = max(float(jnp.max(jnp.abs(b.astype(jnp.float32)))), 1e-6)
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=gtol * scale
        )


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_end_points_are_the_kls_and_the_limits_of_the_normalised_jsd(impl):
    """b=0: forward KL(p_T || p_S), b=1: reverse KL(p_S || p_T) (values from token_kl, and for
    the reverse KL the student's gradients too); JSD_b / b -> forward KL as b -> 0 and
    JSD_b / (1 - b) -> reverse KL as b -> 1 (METHODS.md: "b -> 0 forward KL, b -> 1 reverse KL";
    TRL's GKD docs: beta 0 forward, beta 1 reverse)."""
    hs, ws, ht, wt, g = _inputs(2)
    forward = token_kl(ht, wt, hs, ws, implementation="reference")
    reverse = token_kl(hs, ws, ht, wt, implementation="reference")
    (_, j0), _ = _value_and_grads(impl, hs, ws, ht, wt, g, beta=0.0)
    (_, j1), g1 = _value_and_grads(impl, hs, ws, ht, wt, g, beta=1.0)
    np.testing.assert_allclose(j0, forward, rtol=0, atol=2e-6)
    np.testing.assert_allclose(j1, reverse, rtol=0, atol=2e-6)

    def kl_loss(hs, ws):
        return jnp.sum(g * token_kl(hs, ws, ht, wt, implementation="reference"))

    for a, b in zip(g1[:2], jax.grad(kl_loss, (0, 1))(hs, ws), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)
    # The approach is slow where p_T / p_S is large (a b log b term), so milder logits here:
    # 5% / 3% off at eps=1e-2, 0.6% / 0.4% at 1e-3 (below 1e-4 float32 rounding takes over).
    eps = 1e-3
    hs, ht = hs * 0.5, ht * 0.5
    forward = token_kl(ht, wt, hs, ws, implementation="reference")
    reverse = token_kl(hs, ws, ht, wt, implementation="reference")
    near0 = token_jsd(hs, ws, ht, wt, beta=eps, implementation=impl) / eps
    near1 = token_jsd(hs, ws, ht, wt, beta=1 - eps, implementation=impl) / eps
    np.testing.assert_allclose(near0, forward, rtol=1e-2)
    np.testing.assert_allclose(near1, reverse, rtol=1e-2)


def test_bounds_and_symmetry():
    """0 <= JSD_b <= H(b) = -b log b - (1-b) log(1-b); JSD_b(T, S) = JSD_{1-b}(S, T) (the roles
    of student and teacher swapped); JSD of a model with itself is 0."""
    hs, ws, ht, wt, _ = _inputs(3)
    b = 0.3
    j = np.asarray(token_jsd(hs, ws, ht, wt, beta=b))
    h_b = -b * np.log(b) - (1 - b) * np.log(1 - b)
    assert np.all(j >= -1e-7) and np.all(j <= h_b + 1e-6)
    np.testing.assert_allclose(j, token_jsd(ht, wt, hs, ws, beta=1 - b), rtol=0, atol=2e-6)
    np.testing.assert_allclose(token_jsd(hs, ws, hs, ws, beta=b), 0.0, atol=2e-6)


def _shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for v in (*eqn.invars, *eqn.outvars):
            if hasattr(v, "aval") and hasattr(v.aval, "shape"):
                yield tuple(v.aval.shape)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _shapes(sub)


def test_xla_never_holds_n_by_v():
    """The blocked path's forward + backward jaxpr (the custom_vjp's rules included) holds
    nothing of N x V elements, while the reference's does."""
    n, vocab, block = 48, 320, 64
    hs, ws, ht, wt, g = _inputs(4, lead=(n,), vocab=vocab)

    def shapes(impl):
        def loss(hs, ws):
            return jnp.sum(g * token_jsd(hs, ws, ht, wt, implementation=impl, block_size=block))

        return set(_shapes(jax.make_jaxpr(jax.grad(loss, (0, 1)))(hs, ws).jaxpr))

    def big(s):
        return int(np.prod(s)) >= n * vocab

    assert [s for s in shapes("reference") if big(s)]
    assert not [s for s in shapes("xla") if big(s)], shapes("xla")


def test_mask_and_bad_inputs():
    hs, ws, ht, wt, g = _inputs(5)
    mask = jnp.ones(g.shape, bool).at[0, 1:].set(False)
    ht = jnp.where(mask[..., None], ht, jnp.nan)  # masked rows never leak
    (_, out), grads = _value_and_grads("xla", hs, ws, ht, wt, g, mask=mask)
    assert np.all(np.asarray(out)[~np.asarray(mask)] == 0)
    assert np.all(np.asarray(grads[0])[~np.asarray(mask)] == 0)
    assert np.all(np.isfinite(np.asarray(grads[1])))
    with pytest.raises(ValueError, match="must share V"):
        token_jsd(hs, ws, ht, wt[:, :-1])
    with pytest.raises(ValueError, match="beta=1.5"):
        token_jsd(hs, ws, ht, wt, beta=1.5)
    with pytest.raises(ValueError, match="temperature=0"):
        token_jsd(hs, ws, ht, wt, temperature=0)
    with pytest.raises(ValueError, match="no implementation 'pallas_tpu'"):
        token_jsd(hs, ws, ht, wt, implementation="pallas_tpu")


def test_memory_benchmark_quick(capsys):
    """benchmarks/distill_memory.py --quick: the naive path's temporaries hold both [N, V]
    logits (at least two [N, V] arrays), the kernel's well under half of that."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "distill_memory.py"
    spec = importlib.util.spec_from_file_location("distill_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--quick"])
    assert out["naive"] >= 2 * out["nv_bytes"]
    assert out["kernel"] < out["naive"] / 2
    assert "ratio naive / kernel" in capsys.readouterr().out
