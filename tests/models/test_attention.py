"""jaxalign.models.attention: the attention call against float64 NumPy written from the formula
(GQA, causal, packed segments, sliding window; values and gradients), the choice by platform,
and the config key that picks it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import models as M
from jaxalign.config import base_config
from jaxalign.errors import ConfigError
from jaxalign.models import attention as A
from jaxalign.models.transformer import attention_mask
from jaxalign.train.run import model_config_from


def _inputs(B=2, T=12, N=4, K=2, H=8, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(k[0], (B, T, N, H), jnp.float32)
    kk = jax.random.normal(k[1], (B, T, K, H), jnp.float32)
    v = jax.random.normal(k[2], (B, T, K, H), jnp.float32)
    cot = jax.random.normal(k[3], (B, T, N, H), jnp.float32)
    # Row 0: one sequence; row 1: two packed sequences, then padding (segment 0).
    seg = np.array([[1] * T, [1] * 5 + [2] * 4 + [0] * (T - 9)], np.int32)
    pos = np.array([np.arange(T), [*range(5), *range(4), *([0] * (T - 9))]], np.int32)
    return q, kk, v, cot, jnp.asarray(seg), jnp.asarray(pos)


def _numpy_attention(q, k, v, mask, scale):
    """softmax over keys of scale q.k (masked keys excluded) times v, query head n on kv head
    n // (N / K), float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    G = N // k.shape[2]
    out = np.zeros_like(q)
    m = np.asarray(mask)[:, 0]
    for b in range(B):
        for n in range(N):
            s = scale * q[b, :, n] @ k[b, :, n // G].T
            s = np.where(m[b], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, :, n] = p @ v[b, :, n // G]
    return out


@pytest.mark.parametrize("window, blocks", [(None, 1), (3, 1), (None, 5), (3, 3), (None, 40)])
def test_xla_matches_numpy_values_and_gradients(window, blocks):
    """Causal query blocks (5 of sizes 2-3, 3 of 4, 40 > T: one per query) give the same values
    and gradients, packed rows and windows included."""
    q, k, v, cot, seg, pos = _inputs()
    T = q.shape[1]
    slots = jnp.arange(T)
    mask = attention_mask(seg, seg, slots, slots, pos, pos, window)
    scale = 0.3

    @jax.jit
    def attend(q, k, v):
        return A.attend(q, k, v, mask, scale=scale, implementation="xla", query_blocks=blocks)

    out = attend(q, k, v)
    ref = _numpy_attention(q, k, v, mask, scale)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

    # Gradients: d/dq sum(out * cot) against central differences of the float64 reference.
    grads = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * cot), argnums=(0, 1, 2))(q, k, v)
    c = np.asarray(cot, np.float64)
    rng = np.random.default_rng(0)
    for i, x in enumerate((q, k, v)):
        for _ in range(6):
            idx = tuple(rng.integers(0, d) for d in x.shape)
            eps = 1e-4
            xs = [np.asarray(t, np.float64) for t in (q, k, v)]
            xs[i][idx] += eps
            up = np.sum(_numpy_attention(*xs, mask, scale) * c)
            xs[i][idx] -= 2 * eps
            down = np.sum(_numpy_attention(*xs, mask, scale) * c)
            np.testing.assert_allclose(grads[i][idx], (up - down) / (2 * eps), atol=2e-3)


def _numpy_decode_attention(q, k, v, mask, scale, cap):
    """One query per row: softmax over the visible slots of cap tanh(scale q.k / cap) (no cap:
    scale q.k) times v, query head n on kv head n // (N / K), float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, _, N, H = q.shape
    G = N // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            s = scale * k[b, :, n // G] @ q[b, 0, n]
            s = s if cap is None else cap * np.tanh(s / cap)
            s = np.where(np.asarray(mask)[b, 0, 0], s, -np.inf)
            p = np.exp(s - s.max())
            out[b, 0, n] = (p / p.sum()) @ v[b, :, n // G]
    return out


@pytest.mark.parametrize("N, K, cap", [(4, 2, None), (4, 4, None), (6, 1, None), (8, 2, 5.0)])
def test_decode_attention_matches_numpy(N, K, cap):
    """Block-diagonal queries against the cache as it lies: every head reads only its own kv
    head (GQA, MHA, MQA), masked slots drop out, the soft-cap applies before the mask."""
    B, S, H = 3, 11, 8
    keys = jax.random.split(jax.random.key(N * 10 + K), 3)
    q = jax.random.normal(keys[0], (B, 1, N, H), jnp.float32)
    k = jax.random.normal(keys[1], (B, S, K, H), jnp.float32)
    v = jax.random.normal(keys[2], (B, S, K, H), jnp.float32)
    mask = np.ones((B, 1, 1, S), bool)
    mask[0, ..., 7:] = False  # a row that has not written its last slots yet
    mask[1, ..., :4] = False  # left padding
    mask[2, ..., ::2] = False
    out = jax.jit(A.decode_attention, static_argnames=("scale", "softcap"))(
        q, k, v, jnp.asarray(mask), scale=0.4, softcap=cap
    )
    ref = _numpy_decode_attention(q, k, v, mask, 0.4, cap)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_block_diagonal_decode_by_platform_and_length(monkeypatch):
    """Decode steps (one new token) on CPU only: a prefill or candidate batch (T > 1) and other
    platforms attend as before."""
    assert A.block_diagonal_decode(1) and not A.block_diagonal_decode(2)
    for backend in ("tpu", "gpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert not A.block_diagonal_decode(1)


def test_auto_is_cudnn_on_gpu_splash_on_tpu_xla_elsewhere(monkeypatch):
    q, k, v, _, seg, pos = _inputs()
    slots = jnp.arange(q.shape[1])
    mask = attention_mask(seg, seg, slots, slots, pos, pos, None)
    auto = A.attend(q, k, v, mask, scale=None, implementation="auto")
    xla = A.attend(q, k, v, mask, scale=None, implementation="xla")
    np.testing.assert_array_equal(auto, xla)
    for backend, expected in (
        ("cpu", "xla"),
        ("tpu", "splash"),
        ("gpu", "cudnn"),
        ("cuda", "cudnn"),
    ):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert A.resolve("auto") == expected
        assert A.resolve("xla") == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    with pytest.raises(ValueError, match='attention="cudnn" needs a GPU backend'):
        A.resolve("cudnn")
    with pytest.raises(ValueError, match="expected one of"):
        A.resolve("flash")


def test_causal_query_blocks_by_platform_and_length(monkeypatch):
    """ceil(T / 32) blocks, at most 8, on CPU; one elsewhere (a TPU or GPU runs its own kernel or
    XLA's plain path)."""
    got = {T: A.causal_query_blocks(T) for T in (1, 32, 33, 254, 256, 257, 4096)}
    assert got == {1: 1, 32: 1, 33: 2, 254: 8, 256: 8, 257: 8, 4096: 8}
    for backend in ("tpu", "gpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert A.causal_query_blocks(254) == 1


def test_model_forward_xla_equals_auto_on_cpu_packed_and_windowed():
    """tiny-gemma3 has local and global layers (per-layer masks scanned as data)."""
    config = M.get_preset("tiny-gemma3")
    params = M.init_params(config, jax.random.key(0))
    _, _, _, _, seg, pos = _inputs()
    tokens = jax.random.randint(jax.random.key(1), seg.shape, 0, config.vocab_size)
    auto = M.forward(config, params, tokens, pos, seg)
    xla = M.forward(config.replace(attention="xla"), params, tokens, pos, seg)
    np.testing.assert_array_equal(auto, xla)


def test_config_key_picks_the_attention():
    c = base_config()
    assert model_config_from(c).attention == "auto"
    c.model.attention = "xla"
    assert model_config_from(c).attention == "xla"
    c.model.attention = "flash"
    with pytest.raises(ConfigError, match="attention='flash'"):
        model_config_from(c)
    with pytest.raises(ValueError, match="ModelConfig.attention"):
        M.get_preset("tiny-64", attention="flash")
