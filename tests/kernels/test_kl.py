"""token_kl (full-vocabulary KL) vs the reference, with and without a final-logit soft-cap; the
k1/k2/k3 estimators vs NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.kernels import kl_k1, kl_k2, kl_k3, token_kl
from jaxalign.kernels.kl import pallas_gpu, pallas_tpu

V = 203  # not a multiple of the block
CAP = 3.0  # logits here have std ~3-4, so the cap saturates many of them


def _inputs(seed, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 5)
    hp = jax.random.normal(k[0], (2, 5, 16), jnp.float32).astype(dtype)
    wp = (jax.random.normal(k[1], (16, V), jnp.float32) * 0.7).astype(dtype)
    hq = jax.random.normal(k[2], (2, 5, 24), jnp.float32).astype(dtype)  # q may have another D
    wq = (jax.random.normal(k[3], (24, V), jnp.float32) * 0.7).astype(dtype)
    g = jax.random.normal(k[4], (2, 5), jnp.float32)
    return hp, wp, hq, wq, g


IMPLS = [
    pytest.param("xla", {}, id="xla"),
    pytest.param("pallas_tpu", {"interpret": True}, id="pallas_tpu-interpret"),
    pytest.param("pallas_gpu", {"interpret": True}, id="pallas_gpu-interpret"),
]


def _value_and_grads(impl, hp, wp, hq, wq, g, mask=None, **kw):
    def loss(*args):
        kl = token_kl(*args, implementation=impl, mask=mask, block_size=64, **kw)
        return jnp.sum(kl * g), kl

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(hp, wp, hq, wq)


@pytest.mark.parametrize("softcap", [None, CAP], ids=["nocap", "softcap"])
@pytest.mark.parametrize(
    "dtype,vtol,gtol", [(jnp.float32, 2e-5, 2e-5), (jnp.bfloat16, 2e-3, 2e-2)], ids=["f32", "bf16"]
)
@pytest.mark.parametrize("impl,kw", IMPLS)
def test_matches_reference(impl, kw, dtype, vtol, gtol, softcap):
    """Tolerances as in test_logprob.py (bf16: different summation order, bf16 gradients)."""
    args = _inputs(0, dtype)
    (_, want), want_g = _value_and_grads("reference", *args, softcap=softcap)
    (_, got), got_g = _value_and_grads(impl, *args, softcap=softcap, **kw)
    np.testing.assert_allclose(got, want, rtol=0, atol=vtol)
    assert np.all(np.asarray(want) >= -vtol)
    for a, b in zip(got_g[:2], want_g[:2], strict=True):
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=gtol * scale
        )
    for a, b in zip(got_g[2:], want_g[2:], strict=True):  # q side is a constant
        assert not np.any(np.asarray(a)) and not np.any(np.asarray(b))


def test_softcapped_reference_matches_numpy():
    """The capped spec from the math in float64: KL = sum_j p_j (log p_j - log q_j) with
    z = c tanh(h W / c) on both sides; d(sum_i g_i KL_i) / dzp_ij = g_i p_ij (log p_ij - log q_ij
    - KL_i) (1 - tanh^2), chained to dh_p = dzp W_p^T, dW_p = h_p^T dzp."""
    hp, wp, hq, wq, g = _inputs(3)
    (_, kl), (dhp, dwp, _, _) = _value_and_grads("reference", hp, wp, hq, wq, g, softcap=CAP)
    hp64, hq64 = (np.asarray(x, np.float64).reshape(-1, x.shape[-1]) for x in (hp, hq))
    wp64, wq64, g64 = (np.asarray(x, np.float64) for x in (wp, wq, g.reshape(-1)))

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.sum(np.exp(z), -1, keepdims=True))

    tanh_p = np.tanh(hp64 @ wp64 / CAP)
    logp, logq = log_softmax(CAP * tanh_p), log_softmax(CAP * np.tanh(hq64 @ wq64 / CAP))
    p = np.exp(logp)
    want = np.sum(p * (logp - logq), -1)
    np.testing.assert_allclose(np.asarray(kl).reshape(-1), want, rtol=0, atol=2e-5)
    dz = g64[:, None] * p * (logp - logq - want[:, None]) * (1 - tanh_p**2)
    np.testing.assert_allclose(np.reshape(dhp, hp64.shape), dz @ wp64.T, rtol=0, atol=2e-5)
    np.testing.assert_allclose(dwp, hp64.T @ dz, rtol=0, atol=2e-5)


@pytest.mark.parametrize("impl,kw", IMPLS)
def test_kl_of_identical_is_zero_and_mask(impl, kw):
    hp, wp, _, _, g = _inputs(1)
    np.testing.assert_allclose(token_kl(hp, wp, hp, wp, implementation=impl, **kw), 0.0, atol=1e-5)
    mask = jnp.ones(g.shape, bool).at[1, 2:].set(False)
    hq = jnp.where(mask[..., None], hp * 1.3, jnp.nan)  # masked rows never leak
    (_, kl), grads = _value_and_grads(impl, hp, wp, hq, wp, g, mask=mask, **kw)
    assert np.all(np.asarray(kl)[~np.asarray(mask)] == 0)
    assert np.all(np.asarray(grads[0])[~np.asarray(mask)] == 0)
    assert np.all(np.isfinite(np.asarray(grads[1])))


def test_dispatch():
    hp, wp, hq, wq, _ = _inputs(2)
    np.testing.assert_allclose(  # None -> xla on CPU
        token_kl(hp, wp, hq, wq), token_kl(hp, wp, hq, wq, implementation="reference"), atol=2e-5
    )
    with pytest.raises(ValueError, match="needs a tpu backend"):
        token_kl(hp, wp, hp, wp, implementation="pallas_tpu")
    with pytest.raises(ValueError, match="must share V"):
        token_kl(hp, wp, hq, wq[:, :-1])


def test_estimators_match_numpy():
    rng = np.random.default_rng(0)
    logp = rng.normal(size=64) * 3
    logp_ref = rng.normal(size=64) * 3
    logp[:4], logp_ref[:4] = [0.0, 0.0, 30.0, 0.0], [25.0, -25.0, 0.0, 3.0]  # hit both clamps
    r = np.clip(logp_ref - logp, -20, 20)
    np.testing.assert_allclose(kl_k1(logp, logp_ref), np.clip(-r, -10, 10), rtol=1e-6)
    np.testing.assert_allclose(kl_k2(logp, logp_ref), np.clip(r**2 / 2, -10, 10), rtol=1e-6)
    np.testing.assert_allclose(
        kl_k3(logp, logp_ref), np.clip(np.exp(r) - 1 - r, -10, 10), rtol=1e-5, atol=1e-6
    )
    assert np.all(np.asarray(kl_k3(logp, logp_ref)) >= 0)
    assert float(kl_k3(0.0, 3.0)) == 10.0 and float(kl_k1(30.0, 0.0)) == 10.0


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("platform,module", [("tpu", pallas_tpu), ("cuda", pallas_gpu)])
def test_pallas_lowers_for_hardware(platform, module, softcap):
    """Cross-platform lowering needs no device and runs the Pallas -> Mosaic / Triton lowering."""
    hp = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16)
    wp = jax.ShapeDtypeStruct((256, 1000), jnp.bfloat16)
    hq = jax.ShapeDtypeStruct((512, 128), jnp.bfloat16)
    wq = jax.ShapeDtypeStruct((128, 1000), jnp.bfloat16)
    grad = jax.grad(lambda *a: jnp.sum(module.kl(*a, softcap=softcap)), (0, 1))
    lowered = jax.jit(grad).trace(hp, wp, hq, wq).lower(lowering_platforms=(platform,))
    assert ("tpu_custom_call" if platform == "tpu" else "triton") in lowered.as_text()
