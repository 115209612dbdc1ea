"""jaxalign.models.attention splash path: the Pallas TPU splash kernel (run on CPU in interpret
mode) against the XLA path (itself pinned to float64 NumPy in test_attention.py), values and
gradients for q, k, v: causal, packed segments with padding, GQA (N=4, K=2), sliding window, soft
cap, under a mesh (shard_map); the model with attention="splash" against "xla"; the choice of
"auto" and the fallback when T does not divide into splash blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import models as M
from jaxalign.models import attention as A
from jaxalign.models.transformer import attention_mask, softcapped_attention
from jaxalign.sharding.mesh import make_mesh
from jaxalign.sharding.rules import ShardingRules

SCALE = 0.3
TOL = dict(rtol=1e-5, atol=2e-5)


def _inputs(B, T, N=4, K=2, H=8, seed=0):
    """q, k, v, a cotangent that is zero on padding rows, segment ids and positions. Row 0: one
    sequence; row 1: two packed sequences, then padding; further rows repeat the pattern."""
    key = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(key[0], (B, T, N, H), jnp.float32)
    k = jax.random.normal(key[1], (B, T, K, H), jnp.float32)
    v = jax.random.normal(key[2], (B, T, K, H), jnp.float32)
    a, b = T // 3, T // 2
    rows = [
        ([1] * T, list(range(T))),
        ([1] * a + [2] * b + [0] * (T - a - b), [*range(a), *range(b), *[0] * (T - a - b)]),
    ]
    seg = np.array([rows[i % 2][0] for i in range(B)], np.int32)
    pos = np.array([rows[i % 2][1] for i in range(B)], np.int32)
    cot = jax.random.normal(key[3], q.shape, jnp.float32) * (seg > 0)[:, :, None, None]
    return q, k, v, cot, jnp.asarray(seg), jnp.asarray(pos)


def _xla(q, k, v, seg, pos, window, softcap):
    """The dense-mask path the model runs with attention="xla"."""
    slots = jnp.arange(q.shape[1])
    mask = attention_mask(seg, seg, slots, slots, pos, pos, window)
    if softcap is None:
        return A.attend(q, k, v, mask, scale=SCALE, implementation="xla")
    return softcapped_attention(q, k, v, mask, SCALE, softcap)


def _value_and_vjp(f, q, k, v, cot):
    out, pullback = jax.vjp(f, q, k, v)
    return out, pullback(cot)


def _check(splash, xla, seg):
    """Outputs agree on non-padding rows (a window counts slots in splash, positions in xla, so
    padding rows may differ); q, k, v gradients (cotangent zero on padding) agree everywhere."""
    (out, grads), (ref, ref_grads) = splash, xla
    keep = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(out)[keep], np.asarray(ref)[keep], **TOL)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, **TOL)


@pytest.mark.parametrize(
    "window, local, softcap",
    [
        (40, True, 20.0),
        pytest.param(None, False, None, marks=pytest.mark.slow),
        pytest.param(40, False, 20.0, marks=pytest.mark.slow),
    ],
    ids=["window-softcap", "causal", "global-layer-softcap"],
)
def test_splash_matches_xla_values_and_gradients(window, local, softcap):
    """T=256, B=2 (a whole row; two packed sequences and padding), N=4 query heads on K=2. The
    fast case covers the local kernel with soft cap; test_splash_under_mesh covers the causal
    kernel's gradients, the model test its forward after a window layer's cond."""
    q, k, v, cot, seg, pos = _inputs(B=2, T=256)

    def splash(q, k, v):
        flag = jnp.asarray(local)
        kw = dict(local=flag, window=window, scale=SCALE, softcap=softcap)
        return A.splash_attention(q, k, v, seg, **kw)

    def xla(q, k, v):
        return _xla(q, k, v, seg, pos, window if local else None, softcap)

    got = jax.jit(lambda *a: _value_and_vjp(splash, *a))(q, k, v, cot)
    want = jax.jit(lambda *a: _value_and_vjp(xla, *a))(q, k, v, cot)
    _check(got, want, seg)


def _under_mesh(mesh_shape, B, window):
    """Causal (or window + soft cap) GQA attention under a mesh, the kernel in shard_map (rules
    "fsdp_tp": rows over data/fsdp, heads over tensor), against xla on the same inputs."""
    mesh = make_mesh(mesh_shape)
    rules = ShardingRules.preset("fsdp_tp")
    q, k, v, cot, seg, pos = _inputs(B=B, T=256)
    softcap = None if window is None else 20.0

    def splash(q, k, v):
        kw = dict(local=jnp.asarray(True), window=window, scale=SCALE, softcap=softcap)
        return A.splash_attention(q, k, v, seg, **kw, mesh=mesh, rules=rules)

    lowered = jax.jit(lambda *a: _value_and_vjp(splash, *a)).lower(q, k, v, cot)
    assert "sdy.manual_computation" in lowered.as_text() or "shard_map" in lowered.as_text()
    got = lowered.compile()(q, k, v, cot)
    want = jax.jit(lambda *a: _value_and_vjp(lambda *x: _xla(*x, seg, pos, window, softcap), *a))(
        q, k, v, cot
    )
    _check(got, want, seg)


def test_splash_under_mesh():
    """data=2, fsdp=2, tensor=2, causal: K=2 kv heads split like the N=4 query heads."""
    _under_mesh({"data": 2, "fsdp": 2, "tensor": 2}, B=4, window=None)


@pytest.mark.slow
def test_splash_under_mesh_kv_heads_repeated():
    """tensor=4 > K=2, window + soft cap: k and v are repeated to N heads before the shard_map."""
    _under_mesh({"data": 2, "tensor": 4}, B=2, window=40)


@pytest.mark.slow
def test_splash_matches_xla_across_blocks():
    """T=384: three blocks of 128, so the window (150) and the segment boundaries cross block
    edges (the fast tests run T=256 as one block)."""
    assert A.splash_block(384) == 128
    q, k, v, cot, seg, pos = _inputs(B=2, T=384)

    def splash(q, k, v):
        return A.splash_attention(q, k, v, seg, local=True, window=150, scale=SCALE, softcap=None)

    got = jax.jit(lambda *a: _value_and_vjp(splash, *a))(q, k, v, cot)
    want = jax.jit(lambda *a: _value_and_vjp(lambda *x: _xla(*x, seg, pos, 150, None), *a))(
        q, k, v, cot
    )
    _check(got, want, seg)


def _gemma2(T):
    config = M.get_preset("tiny-gemma2")
    params = M.init_params(config, jax.random.key(0))
    _, _, _, _, seg, pos = _inputs(B=2, T=T)
    tokens = jax.random.randint(jax.random.key(1), seg.shape, 0, config.vocab_size)
    return config, params, tokens, seg, pos


def test_model_splash_equals_xla_gemma2_local_global_softcap():
    """tiny-gemma2: soft cap, window 4 on every other layer (the layer flag is scanned data, the
    kernel picked by lax.cond), GQA, packed rows; hidden states, and no dense mask built."""
    config, params, tokens, seg, pos = _gemma2(256)
    c = config.replace(attention="splash")
    lowered = jax.jit(lambda p: M.forward(c, p, tokens, pos, seg)).lower(params)
    assert "2x1x256x256xi1" not in lowered.as_text()  # no [B, 1, T, S] boolean mask
    out = lowered.compile()(params)
    c = config.replace(attention="xla")
    ref = jax.jit(lambda p: M.forward(c, p, tokens, pos, seg))(params)
    keep = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(out)[keep], np.asarray(ref)[keep], **TOL)


@pytest.mark.slow
def test_model_splash_equals_xla_gemma2_parameter_gradients():
    """The same model's parameter gradients (d/dparams of sum(hidden * cot), cot zero on
    padding). They sum over 512 tokens, so entries that cancel to ~0.1 within a tensor whose
    entries reach ~200 carry float32 differences of ~3e-4: compared on the tensor's scale,
    |g - g_xla| <= 1e-5 max|g_xla|."""
    config, params, tokens, seg, pos = _gemma2(256)
    cot = jax.random.normal(jax.random.key(2), (*seg.shape, config.d_model)) * (seg > 0)[..., None]

    def grads(attention):
        c = config.replace(attention=attention)
        f = jax.jit(lambda p: jax.vjp(lambda p: M.forward(c, p, tokens, pos, seg), p)[1](cot))
        return f(params)[0]

    def close(g, r):
        assert np.max(np.abs(g - r)) <= 1e-5 * np.max(np.abs(r))

    jax.tree.map(close, grads("splash"), grads("xla"))


def test_auto_picks_splash_on_tpu_and_xla_when_t_does_not_divide(monkeypatch):
    assert [A.splash_block(t) for t in (128, 256, 384, 1024, 8192, 100, 200)] == [
        128,
        256,
        128,
        512,
        512,
        None,
        None,
    ]
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert A.resolve("auto") == "splash"
    assert A.resolve("auto", 4096) == "splash"
    assert A.resolve("auto", 200) == "xla"
    assert A.resolve("splash", 200) == "xla"
    assert A.resolve("xla", 4096) == "xla"
    with pytest.raises(ValueError, match='attention="cudnn" needs a GPU backend'):
        A.resolve("cudnn")
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert A.resolve("auto", 4096) == "xla"
    assert A.resolve("splash", 4096) == "splash"  # interpret mode off TPU


def test_model_falls_back_to_xla_when_t_does_not_divide():
    """attention="splash" at T=12: the dense-mask XLA path, bit for bit."""
    config = M.get_preset("tiny-64")
    params = M.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)

    def forward(attention):
        c = config.replace(attention=attention)
        return jax.jit(lambda p: M.forward(c, p, tokens))(params)

    np.testing.assert_array_equal(forward("splash"), forward("xla"))
