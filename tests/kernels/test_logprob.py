"""Every token_logprobs implementation against the reference: values and gradients.

Tolerances (fixed; do not relax, find out why a result moved):
- float32 inputs: values atol 2e-5, gradients atol 2e-5 * max|reference grad| (summation order).
- bfloat16 inputs (f32 accumulation in both): values atol 2e-3 (the reference and the kernels round
  the same bf16 inputs but sum tiles in a different order); gradients are bf16 outputs, compared at
  atol 2e-2 * max|reference grad| (one bf16 ulp is ~0.4%; the backward also rounds dz to bf16
  before each matmul, as the reference's own backward does).
Pallas kernels run in interpret mode on CPU with tiny shapes. Final-logit soft-capping
(``softcap=``) is tested with the same tolerances, the capped reference itself against float64
NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxalign.kernels import logprob, sharded_token_logprobs, token_logprobs
from jaxalign.kernels.logprob import pallas_gpu, pallas_tpu

D, V, BLOCK = 32, 203, 64  # V deliberately not a multiple of BLOCK
IMPLS = [
    pytest.param("xla", {}, id="xla"),
    # implementation=None on CPU: xla keeping the logits tiles for the backward (within budget).
    pytest.param(None, {}, id="cpu-default-kept-logits"),
    pytest.param("pallas_tpu", {"interpret": True}, id="pallas_tpu-interpret"),
    pytest.param("pallas_gpu", {"interpret": True}, id="pallas_gpu-interpret"),
]
TOL = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (2e-3, 2e-2)}
CAP = 3.0  # logits here have std ~4, so the cap saturates many of them


def _inputs(seed, lead=(2, 7), dtype=jnp.float32, vocab=V):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (*lead, D), jnp.float32).astype(dtype)
    w = (jax.random.normal(k[1], (D, vocab), jnp.float32) * 0.7).astype(dtype)
    t = jax.random.randint(k[2], lead, 0, vocab)
    g = jax.random.normal(k[3], (3, *lead), jnp.float32)  # upstream weights for the three outputs
    return h, w, t, g


def _value_and_grads(impl, kw, h, w, t, g, mask=None, block_size=BLOCK, softcap=None):
    def loss(h, w):
        lp, ex = token_logprobs(
            h,
            w,
            t,
            implementation=impl,
            mask=mask,
            return_entropy=True,
            return_sum_sq=True,
            block_size=block_size,
            softcap=softcap,
            **kw,
        )
        out = (lp, ex["entropy"], ex["sum_sq_probs"])
        return sum(jnp.sum(o * gi) for o, gi in zip(out, g, strict=True)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w)
    return out, grads


def _close(got, want, atol):
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=atol
    )


@pytest.mark.parametrize("softcap", [None, CAP], ids=["nocap", "softcap"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("impl,kw", IMPLS)
def test_matches_reference(impl, kw, dtype, softcap):
    h, w, t, g = _inputs(1, dtype=dtype)
    want, want_g = _value_and_grads("reference", {}, h, w, t, g, softcap=softcap)
    got, got_g = _value_and_grads(impl, kw, h, w, t, g, softcap=softcap)
    vtol, gtol = TOL[dtype]
    for a, b in zip(got, want, strict=True):
        assert a.dtype == jnp.float32 and a.shape == t.shape
        _close(a, b, vtol)
    for a, b in zip(got_g, want_g, strict=True):
        assert a.dtype == b.dtype
        _close(a, b, gtol * float(jnp.max(jnp.abs(b.astype(jnp.float32)))))


def test_softcapped_reference_matches_numpy():
    """The capped spec from the math in float64: z = c tanh(h W / c), log-probs, entropy, sum of
    squares, and d(sum_i g_i logp_i) / dh_i = g_i sum_j (1[j = t_i] - p_ij) (1 - tanh^2) W[:, j]
    (dW likewise)."""
    h, w, t, g = _inputs(7, lead=(9,))

    def weighted(h, w):
        lp, ex = token_logprobs(
            h,
            w,
            t,
            implementation="reference",
            return_entropy=True,
            return_sum_sq=True,
            softcap=CAP,
        )
        return jnp.sum(g[0] * lp), (lp, ex["entropy"], ex["sum_sq_probs"])

    (_, (lp, ent, sq)), (dh, dw) = jax.value_and_grad(weighted, (0, 1), has_aux=True)(h, w)
    h64, w64, g64 = (np.asarray(x, np.float64) for x in (h, w, g[0]))
    tanh = np.tanh(h64 @ w64 / CAP)
    z = CAP * tanh
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.sum(np.exp(logp), -1, keepdims=True))
    p = np.exp(logp)
    np.testing.assert_allclose(lp, logp[np.arange(9), np.asarray(t)], rtol=0, atol=2e-5)
    np.testing.assert_allclose(ent, -np.sum(p * logp, -1), rtol=0, atol=2e-5)
    np.testing.assert_allclose(sq, np.sum(p * p, -1), rtol=0, atol=2e-5)
    dz = g64[:, None] * (np.eye(V)[np.asarray(t)] - p) * (1 - tanh**2)
    np.testing.assert_allclose(dh, dz @ w64.T, rtol=0, atol=2e-5)
    np.testing.assert_allclose(dw, h64.T @ dz, rtol=0, atol=2e-5)


@pytest.mark.parametrize("impl,kw", IMPLS)
@pytest.mark.parametrize("vocab,block", [(64, 64), (50, 64), (203, 16)])
def test_block_edges(impl, kw, vocab, block):
    """V equal to, smaller than, and far from a multiple of the vocab tile."""
    h, w, t, g = _inputs(2, lead=(9,), vocab=vocab)
    want, want_g = _value_and_grads("reference", {}, h, w, t, g)
    got, got_g = _value_and_grads(impl, kw, h, w, t, g, block_size=block)
    for a, b in zip((*got, *got_g), (*want, *want_g), strict=True):
        _close(a, b, 2e-5 * max(1.0, float(jnp.max(jnp.abs(b)))))


@pytest.mark.parametrize("impl,kw", [pytest.param("reference", {}, id="reference"), *IMPLS])
def test_mask_gives_zero_value_and_gradient(impl, kw):
    h, w, t, g = _inputs(3)
    mask = jax.random.bernoulli(jax.random.key(9), 0.6, t.shape)
    t = jnp.where(mask, t, -100)  # padding targets are allowed where masked
    h = jnp.where(mask[..., None], h, jnp.inf)  # even non-finite masked rows stay harmless
    (lp, ent, sq), (dh, dw) = _value_and_grads(impl, kw, h, w, t, g, mask=mask)
    assert np.all(np.asarray(lp)[~np.asarray(mask)] == 0)
    assert np.all(np.asarray(ent)[~np.asarray(mask)] == 0)
    assert np.all(np.asarray(dh)[~np.asarray(mask)] == 0)
    assert np.all(np.isfinite(np.asarray(dw)))
    hm = jnp.where(mask[..., None], h, 0.0)
    (lp_ref, _, _), (_, dw_ref) = _value_and_grads(
        "reference", {}, hm, w, jnp.where(mask, t, 0), g * mask
    )
    _close(lp, jnp.where(mask, lp_ref, 0.0), 2e-5)
    _close(dw, dw_ref, 2e-5 * float(jnp.max(jnp.abs(dw_ref))))


def test_out_of_range_targets():
    h, w, t, _ = _inputs(4)
    bad = t.at[1, 3].set(V)
    with pytest.raises(ValueError, match=r"targets\[1, 3\] = 203 is outside the vocabulary"):
        token_logprobs(h, w, bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_logprobs(h, w, t.at[0, 0].set(-1), implementation="reference")
    # Under jit the values are unknown: those positions are NaN, the rest unaffected.
    lp = jax.jit(lambda h, w, t: token_logprobs(h, w, t, implementation="xla"))(h, w, bad)
    assert np.isnan(lp[1, 3]) and np.isfinite(np.delete(np.asarray(lp).ravel(), 1 * 7 + 3)).all()
    # Masked out-of-range targets are fine.
    mask = jnp.ones(t.shape, bool).at[1, 3].set(False)
    assert np.isfinite(token_logprobs(h, w, bad, mask=mask)).all()


def test_dispatch_and_shapes():
    h, w, t, _ = _inputs(5)
    assert token_logprobs(h, w, t).shape == t.shape  # None -> xla on CPU
    flat = token_logprobs(h.reshape(-1, D), w, t.reshape(-1), implementation="reference")
    _close(flat.reshape(t.shape), token_logprobs(h, w, t, implementation="reference"), 1e-6)
    with pytest.raises(ValueError, match="needs a tpu backend"):
        token_logprobs(h, w, t, implementation="pallas_tpu")
    with pytest.raises(ValueError, match="unknown implementation"):
        token_logprobs(h, w, t, implementation="cuda")
    with pytest.raises(ValueError, match="expected targets.shape"):
        token_logprobs(h[:, :3], w, t)


def test_cpu_default_keeps_logits_within_the_budget(monkeypatch):
    """implementation=None on CPU holds the float32 [N, V] logits between forward and backward
    while 4 N V <= CPU_KEEP_LOGITS_BYTES, and recomputes them (O(N block) memory) above it;
    ``xla`` named explicitly always recomputes. The results are the same either way."""
    n, vocab = 64, 512
    h, w, t, g = _inputs(11, lead=(n,), vocab=vocab)
    logits_bytes = 4 * n * vocab

    def temp_bytes(impl):
        def loss(h, w):
            return jnp.sum(g[0] * token_logprobs(h, w, t, implementation=impl, block_size=64))

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return fn.lower(h, w).compile().memory_analysis().temp_size_in_bytes, fn(h, w)

    assert logits_bytes <= logprob.CPU_KEEP_LOGITS_BYTES
    kept, kept_out = temp_bytes(None)
    recomputed, xla_out = temp_bytes("xla")
    monkeypatch.setattr(logprob, "CPU_KEEP_LOGITS_BYTES", logits_bytes - 1)
    over_budget, _ = temp_bytes(None)
    assert kept >= logits_bytes > recomputed, (kept, recomputed)
    assert over_budget < logits_bytes, over_budget
    for a, b in zip(jax.tree.leaves(kept_out), jax.tree.leaves(xla_out), strict=True):
        _close(a, b, 1e-6 * max(1.0, float(jnp.max(jnp.abs(b)))))


@pytest.mark.parametrize(
    "token_axes,softcap", [(None, None), ("data", None), ("data", CAP)], ids=["v", "dv", "dv-cap"]
)
def test_sharded_matches_unsharded(token_axes, softcap):
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)
    vocab = 200  # divisible by the 4 vocab shards; each shard's 50 columns not by BLOCK
    h, w, t, g = _inputs(6, lead=(4, 6), vocab=vocab)
    mask = jnp.ones(t.shape, bool).at[0, :2].set(False)

    def run(fn):
        def loss(h, w):
            lp, ex = fn(h, w, t, mask=mask, return_entropy=True, return_sum_sq=True)
            out = (lp, ex["entropy"], ex["sum_sq_probs"])
            return sum(jnp.sum(o * gi) for o, gi in zip(out, g, strict=True)), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w)

    (_, want), want_g = run(
        lambda *a, **k: token_logprobs(*a, implementation="reference", softcap=softcap, **k)
    )
    (_, got), got_g = run(
        lambda *a, **k: sharded_token_logprobs(
            *a,
            mesh=mesh,
            vocab_axis="tensor",
            token_axes=token_axes,
            implementation="xla",
            block_size=16,
            softcap=softcap,
            **k,
        )
    )
    for a, b in zip((*got, *got_g), (*want, *want_g), strict=True):
        _close(a, b, 3e-5 * max(1.0, float(jnp.max(jnp.abs(b)))))


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("platform,module", [("tpu", pallas_tpu), ("cuda", pallas_gpu)])
def test_pallas_lowers_for_hardware(platform, module, softcap):
    """Cross-platform lowering needs no device and runs the Pallas -> Mosaic / Triton lowering."""
    h = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((256, 1000), jnp.bfloat16)  # V not a multiple of the tile
    t = jax.ShapeDtypeStruct((512,), jnp.int32)

    def loss(h, w, t):
        lp, ent, sq = module.logprobs(
            h, w, t, return_entropy=True, return_sum_sq=True, softcap=softcap
        )
        return jnp.sum(lp + ent + sq)

    lowered = jax.jit(jax.grad(loss, (0, 1))).trace(h, w, t).lower(lowering_platforms=(platform,))
    assert ("tpu_custom_call" if platform == "tpu" else "triton") in lowered.as_text()


def test_the_gpu_kernel_takes_float32_master_weights_with_bfloat16_activations():
    """Mixed precision hands the kernel bf16 hidden states and the f32 unembedding: it computes
    as with the unembedding cast to bf16 (Triton multiplies like types only), and the
    unembedding's gradient comes back in float32."""
    h, w, t, _ = _inputs(5, dtype=jnp.float32)
    h = h.reshape(-1, D).astype(jnp.bfloat16)
    t = t.reshape(-1)

    def run(w):
        return jax.value_and_grad(
            lambda w: pallas_gpu.logprobs(h, w, t, block_size=BLOCK, interpret=True)[0].sum()
        )(w)

    (mixed, dw_mixed), (cast, dw_cast) = run(w), run(w.astype(jnp.bfloat16))
    assert dw_mixed.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(mixed), np.asarray(cast))
    np.testing.assert_array_equal(np.asarray(dw_mixed), np.asarray(dw_cast, np.float32))
