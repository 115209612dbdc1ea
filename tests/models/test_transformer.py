"""Tests for jaxalign.models: shapes, parameter counts, masking, KV cache, remat, RoPE scaling."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import models as M
from jaxalign.models import attention
from jaxalign.models.transformer import layer_unroll

TINY = ["tiny-64", "tiny-qwen2", "tiny-qwen3"]

# Published parameter counts (HF safetensors totals; tied models count the embedding once).
PUBLISHED = {
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
    "llama3.1-70b": 70_553_706_496,
    "mistral-7b": 7_248_023_552,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
    "qwen3-8b": 8_190_735_360,
}

_forward = jax.jit(M.forward, static_argnums=0)
_init = jax.jit(M.init_params, static_argnums=0)
_step = jax.jit(M.forward_with_cache, static_argnums=0)


@functools.lru_cache
def _params(name, param_dtype):
    """Params shared by tests (init compiles are the slowest part of this file)."""
    return _init(M.get_preset(name, param_dtype=param_dtype), jax.random.key(0))


def _setup(name, **overrides):
    config = M.get_preset(name, **overrides)
    return config, _params(name, config.param_dtype)


def _tokens(config, shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, config.vocab_size, jnp.int32)


def _reference_forward(config, params, tokens):
    """Plain float64 NumPy decoder, one unpacked batch: explicit KV-head repeat, causal softmax."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    B, T = tokens.shape
    N, K, H = config.n_heads, config.n_kv_heads, config.head_dim

    def rms(x, scale):
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + config.norm_eps) * scale

    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, H, 2) / H)
    ang = np.arange(T)[:, None] * inv_freq[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [B, T, n, H]
        half = np.concatenate([-x[..., H // 2 :], x[..., : H // 2]], -1)
        return x * cos[None, :, None] + half * sin[None, :, None]

    x = p["embed"]["embedding"][np.asarray(tokens)]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(config.n_layers):
        lp = jax.tree.map(lambda a, i=i: a[i], p["layers"])
        a = lp["attn"]
        h = rms(x, lp["attn_norm"]["scale"])
        q = np.einsum("btd,dnh->btnh", h, a["q_proj"]["kernel"])
        k = np.einsum("btd,dkh->btkh", h, a["k_proj"]["kernel"])
        v = np.einsum("btd,dkh->btkh", h, a["v_proj"]["kernel"])
        if config.qkv_bias:
            q, k, v = q + a["q_proj"]["bias"], k + a["k_proj"]["bias"], v + a["v_proj"]["bias"]
        if config.qk_norm:
            q, k = rms(q, a["q_norm"]["scale"]), rms(k, a["k_norm"]["scale"])
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
        s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
        s = np.where(causal, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bnts,bsnh->btnh", w, v)
        x = x + np.einsum("btnh,nhd->btd", o, a["o_proj"]["kernel"])
        h = rms(x, lp["mlp_norm"]["scale"])
        m = lp["mlp"]
        g = h @ m["gate_proj"]["kernel"]
        x = x + (g / (1 + np.exp(-g)) * (h @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
    return rms(x, p["final_norm"]["scale"])


@pytest.mark.parametrize("name", TINY)
def test_shapes_and_matches_numpy_reference(name):
    config, params = _setup(name)
    tokens = _tokens(config, (2, 12))
    hidden = _forward(config, params, tokens)
    assert hidden.shape == (2, 12, config.d_model) and hidden.dtype == jnp.float32
    assert M.unembedding(config, params).shape == (config.d_model, config.vocab_size)
    assert ("unembed" in params) == (not config.tie_embeddings)
    attn = params["layers"]["attn"]
    assert ("bias" in attn["q_proj"]) == config.qkv_bias
    assert ("q_norm" in attn) == config.qk_norm
    L, D, N, K, H = (
        config.n_layers,
        config.d_model,
        config.n_heads,
        config.n_kv_heads,
        config.head_dim,
    )
    assert attn["q_proj"]["kernel"].shape == (L, D, N, H)
    assert attn["k_proj"]["kernel"].shape == (L, D, K, H)
    assert attn["o_proj"]["kernel"].shape == (L, N, H, D)
    # Non-trivial norm weights and biases so the reference check covers them.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), params)
    expected = _reference_forward(config, params, tokens)
    np.testing.assert_allclose(_forward(config, params, tokens), expected, rtol=2e-4, atol=2e-4)


def test_bfloat16_compute():
    config = M.get_preset("tiny-64", dtype="bfloat16", param_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(M.abstract_params(config)))
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _setup("tiny-64")[1])
    tokens = _tokens(config, (2, 8))
    hidden = _forward(config, params, tokens)
    assert hidden.dtype == jnp.bfloat16
    ref = _forward(config.replace(dtype="float32"), params, tokens)
    np.testing.assert_allclose(hidden.astype(jnp.float32), ref, atol=0.1)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_matches_published(name):
    assert M.param_count(M.get_preset(name)) == PUBLISHED[name]


@pytest.mark.parametrize("name", TINY)
def test_logical_axes_match_params(name):
    config = M.get_preset(name)
    params = M.abstract_params(config)
    axes = M.param_logical_axes(config)
    is_axes = lambda x: isinstance(x, tuple)
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
    allowed = {"layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp"}
    for a, p in zip(jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(params), strict=True):
        assert len(a) == p.ndim and set(a) <= allowed
    assert all(a[0] == "layers" for a in jax.tree.leaves(axes["layers"], is_leaf=is_axes))


def test_init_params_jit_deterministic_and_abstract():
    config, a = _setup("tiny-64")
    b = _init(config, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    shapes = jax.eval_shape(lambda: M.init_params(config, jax.random.key(0)))
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, a)
    layers_q = a["layers"]["attn"]["q_proj"]["kernel"]
    assert not np.allclose(layers_q[0], layers_q[1])  # each layer has its own init
    assert abs(float(jnp.std(layers_q)) - 0.02) < 0.002


@pytest.mark.parametrize("name", ["tiny-64", "tiny-qwen3"])
def test_packed_equals_separate(name):
    config, params = _setup(name)
    a, b = _tokens(config, (1, 5), seed=2), _tokens(config, (1, 7), seed=3)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 4), jnp.int32)], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 7 + [0] * 4])
    positions = jnp.array([list(range(5)) + list(range(7)) + [0] * 4])
    out = _forward(config, params, packed, positions, segments)
    np.testing.assert_allclose(out[:, :5], _forward(config, params, a), atol=1e-5)
    np.testing.assert_allclose(out[:, 5:12], _forward(config, params, b), atol=1e-5)


def test_padding_does_not_affect_valid_positions():
    config, params = _setup("tiny-qwen2")
    x = _tokens(config, (1, 6))
    alone = _forward(config, params, x)
    junk = _tokens(config, (1, 3), seed=9)
    # Right padding.
    right = _forward(
        config, params, jnp.concatenate([x, junk], 1), None, jnp.array([[1] * 6 + [0] * 3])
    )
    np.testing.assert_allclose(right[:, :6], alone, atol=1e-5)
    # Left padding with positions counted from the first real token.
    left = _forward(
        config,
        params,
        jnp.concatenate([junk, x], 1),
        jnp.array([[0] * 3 + list(range(6))]),
        jnp.array([[0] * 3 + [1] * 6]),
    )
    np.testing.assert_allclose(left[:, 3:], alone, atol=1e-5)
    assert np.isfinite(np.asarray(left)).all()


def _padded_prompts(config, lengths, T, side):
    """Prompts of the given lengths padded to T on ``side`` (pad token 0), positions, segments."""
    rows = [_tokens(config, (n,), seed=10 + i) for i, n in enumerate(lengths)]
    tokens, pos, seg = [], [], []
    for r in rows:
        n, pad = r.shape[0], T - r.shape[0]
        left = side == "left"
        tokens.append(jnp.pad(r, (pad, 0) if left else (0, pad)))
        seg.append([0] * pad + [1] * n if left else [1] * n + [0] * pad)
        pos.append([0] * pad + list(range(n)) if left else list(range(n)) + [0] * pad)
    return rows, jnp.stack(tokens), jnp.array(pos, jnp.int32), jnp.array(seg, jnp.int32)


@pytest.mark.parametrize(
    "name,overrides,side",
    [
        ("tiny-64", {}, "left"),
        ("tiny-64", {}, "right"),
        ("tiny-qwen3", {}, "left"),
        ("tiny-qwen2", {"sliding_window": 3}, "left"),
    ],
)
def test_kv_cache_prefill_and_decode_match_full_forward(name, overrides, side):
    config, params = _setup(name, **overrides)
    lengths, T, steps = [5, 3], 6, 4
    rows, tokens, pos, seg = _padded_prompts(config, lengths, T, side)
    cont = _tokens(config, (2, steps), seed=20)
    cache = M.init_cache(config, batch=2, max_len=T + steps)
    hidden, cache = _step(config, params, tokens, pos, cache, seg)
    decoded = []
    for t in range(steps):
        step_pos = jnp.array(lengths, jnp.int32)[:, None] + t
        h, cache = _step(config, params, cont[:, t : t + 1], step_pos, cache)
        decoded.append(h)
    assert int(cache["index"]) == T + steps
    decoded = jnp.concatenate(decoded, axis=1)
    for i, n in enumerate(lengths):
        full = _forward(config, params, jnp.concatenate([rows[i], cont[i]])[None])
        prompt = hidden[i, T - n :] if side == "left" else hidden[i, :n]
        np.testing.assert_allclose(prompt, full[0, :n], atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(decoded[i], full[0, n:], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_same_values_and_grads(policy):
    # float64: remat only reorders float32 roundoff (~1e-6 relative), in float64 it is exact.
    with jax.enable_x64(True):
        config = M.get_preset("tiny-qwen3", dtype="float64", param_dtype="float64")
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), _setup("tiny-qwen3")[1])
        tokens = _tokens(config, (2, 8))

        def loss(p, c):
            return jnp.sum(jnp.tanh(M.forward(c, p, tokens)) ** 2)

        grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
        v0, g0 = grad(params, config)
        v1, g1 = grad(params, config.replace(remat=policy))
    assert g0["embed"]["embedding"].dtype == np.float64
    np.testing.assert_allclose(v1, v0, rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13), g1, g0)


def _float64_loss_and_grads(configs, blocks):
    """value_and_grad of a float64 loss of tiny-qwen3's forward on T = 40 tokens for each
    config, the causal query blocks capped at ``blocks`` (chosen at trace time: a fresh jit)."""
    out = []
    with jax.enable_x64(True), pytest.MonkeyPatch.context() as m:
        m.setattr(attention, "CPU_MAX_QUERY_BLOCKS", blocks)
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), _setup("tiny-qwen3")[1])
        for config in configs:
            tokens = _tokens(config, (2, 40))

            def loss(p, c, tokens=tokens):
                return jnp.sum(jnp.tanh(M.forward(c, p, tokens)) ** 2)

            out.append(jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, config))
    return out


def test_unrolled_layers_same_values_and_grads():
    """The unrolled layer stack changes how, not what, the model computes: exact in float64."""
    config = M.get_preset("tiny-qwen3", dtype="float64", param_dtype="float64")
    configs = [config.replace(layer_loop=loop) for loop in ("scan", "unroll")]
    (v0, g0), (v1, g1) = _float64_loss_and_grads(configs, blocks=1)
    np.testing.assert_allclose(v1, v0, rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13), g1, g0)


def test_causal_query_blocks_same_values_and_grads():
    """T = 40 runs as two query blocks on CPU, against one block. Float64 throughout except the
    attention logits, which jax.nn.dot_product_attention computes in float32 (its
    preferred_element_type): the blocks reorder that float32 roundoff only."""
    config = M.get_preset("tiny-qwen3", dtype="float64", param_dtype="float64")
    assert attention.causal_query_blocks(40) == 2
    ((v0, g0),), ((v1, g1),) = (_float64_loss_and_grads([config], b) for b in (1, 8))
    np.testing.assert_allclose(v1, v0, rtol=1e-9)
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale), g1, g0)


def test_layer_unroll_by_setting_and_platform(monkeypatch):
    assert layer_unroll("auto") and layer_unroll("unroll") and not layer_unroll("scan")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert not layer_unroll("auto") and layer_unroll("unroll")


def _llama31_inv_freq_loop(head_dim, theta, s):
    """Llama 3.1 reference (meta-llama `apply_scaling`), one frequency at a time in float64."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(freq)
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(freq / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * freq / s.factor + smooth * freq)
    return np.array(out)


def test_rope_llama31_scaling_matches_numpy():
    config = M.get_preset("llama3.1-70b")
    got = M.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    want = _llama31_inv_freq_loop(config.head_dim, config.rope_theta, config.rope_scaling)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    base = M.rope_inv_freq(config.head_dim, config.rope_theta)
    assert got[0] == base[0] and np.isclose(got[-1], base[-1] / 8)  # high kept, low scaled
    # Rotation with those frequencies against float64 NumPy: exact in float64; in float32 the
    # angle pos * f carries ~pos * 2^-24 rad of rounding (as in HF), so compare at small pos.
    x = np.random.default_rng(0).normal(size=(1, 3, 2, config.head_dim))
    positions = np.array([[0, 7, 70000]])
    ang = positions[..., None, None] * np.concatenate([want, want])
    half = np.concatenate([-x[..., 64:], x[..., :64]], -1)
    expected = x * np.cos(ang) + half * np.sin(ang)
    with jax.enable_x64(True):
        out = M.apply_rope(jnp.asarray(x), jnp.asarray(positions), got)
    np.testing.assert_allclose(out, expected, atol=1e-10)
    out32 = M.apply_rope(jnp.asarray(x[:, :2], jnp.float32), jnp.asarray(positions[:, :2]), got)
    np.testing.assert_allclose(out32, expected[:, :2], atol=1e-5)


def test_sliding_window_mask_and_receptive_field():
    seg = jnp.ones((1, 6), jnp.int32)
    pos = jnp.arange(6)[None]
    mask = M.attention_mask(seg, seg, jnp.arange(6), jnp.arange(6), pos, pos, 2)[0, 0]
    i, j = np.indices((6, 6))
    np.testing.assert_array_equal(mask, (j <= i) & (i - j < 2))
    # Two layers with window 2: token 0 reaches at most position 2.
    config, params = _setup("tiny-64", sliding_window=2)
    tokens = _tokens(config, (1, 6))
    changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % config.vocab_size)
    diff = np.abs(_forward(config, params, tokens) - _forward(config, params, changed)).max(-1)[0]
    assert (diff[:3] > 1e-4).all() and (diff[3:] == 0).all()
    full = config.replace(sliding_window=None)
    diff = np.abs(_forward(full, params, tokens) - _forward(full, params, changed)).max(-1)[0]
    assert (diff > 1e-4).all()


def test_presets_and_errors():
    assert M.get_preset("mistral-7b").sliding_window is None
    assert M.get_preset("tiny-64", remat="full").remat == "full"
    with pytest.raises(KeyError, match="unknown model preset"):
        M.get_preset("nope")
    with pytest.raises(ValueError, match="n_kv_heads"):
        M.get_preset("tiny-64", n_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        M.get_preset("tiny-64", remat="some")
    with pytest.raises(ValueError, match="layer_loop='loop'; expected one of"):
        M.get_preset("tiny-64", layer_loop="loop")


def test_init_under_jit_with_out_shardings_and_bind_roundtrip():
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    config, params = _setup("tiny-64")
    mesh = Mesh(np.array(jax.devices()).reshape(-1), ("fsdp",))
    axes = M.param_logical_axes(config)
    shardings = jax.tree.map(
        lambda a: NamedSharding(
            mesh, PartitionSpec(*("fsdp" if n == "embed" else None for n in a))
        ),
        axes,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    sharded = jax.jit(M.init_params, static_argnums=0, out_shardings=shardings)(
        config, jax.random.key(0)
    )
    jax.tree.map(lambda s, p: np.testing.assert_array_equal(s, p), sharded, params)
    q = sharded["layers"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == PartitionSpec(None, "fsdp", None, None)
    model = M.bind(config, params)
    roundtrip = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, roundtrip, params)
    tokens = _tokens(config, (1, 4))
    np.testing.assert_allclose(model(tokens), _forward(config, params, tokens), atol=1e-6)


def _grouped_rows(config, prompt_lengths, G, Tp, new):
    """Rows of a rollout's layout: each prompt (left-padded to Tp) repeated G times, followed by
    new - 1 completion inputs of their own, the last row of each group padded at its end (a
    completion that stopped early)."""
    R, T = len(prompt_lengths) * G, Tp + new - 1
    tokens = np.zeros((R, T), np.int32)
    seg, pos = np.zeros((R, T), np.int32), np.zeros((R, T), np.int32)
    rng = np.random.default_rng(0)
    for b, L in enumerate(prompt_lengths):
        prompt = rng.integers(1, config.vocab_size, L)
        for g in range(G):
            r, end = b * G + g, T - (3 if g == G - 1 else 0)
            tokens[r, Tp - L : Tp] = prompt
            tokens[r, Tp:end] = rng.integers(1, config.vocab_size, end - Tp)
            seg[r, Tp - L : end] = 1
            pos[r, Tp - L : end] = np.arange(end - Tp + L)
    return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("tiny-64", {}),
        ("tiny-gemma2", {}),  # soft-capped attention, local layers, post-norms
        # Slow (the two above are the fast siblings): remat; a window on every layer, q/k/v bias.
        pytest.param("tiny-qwen3", {"remat": "full"}, marks=pytest.mark.slow),
        pytest.param("tiny-qwen2", {"sliding_window": 3}, marks=pytest.mark.slow),
    ],
)
def test_grouped_forward_same_values_and_grads_as_the_full_forward(name, overrides):
    """Groups of G rows sharing a left-padded prompt: the prompt's columns run once per group
    and the others attend to them; values and gradients of the columns after the prompt equal
    the full forward's. Float64 except the attention logits (float32 in both paths)."""
    G, Tp, new = 3, 7, 6
    with jax.enable_x64(True):
        config = M.get_preset(name, dtype="float64", param_dtype="float64", **overrides)
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), _setup(name)[1])
        tokens, pos, seg = _grouped_rows(config, [7, 4], G, Tp, new)
        P = Tp - 1
        weights = jnp.asarray(np.random.default_rng(1).normal(size=(tokens.shape[0], new)))

        def full(p):
            return M.forward(config, p, tokens, pos, seg)[:, P:]

        def grouped(p):
            return M.forward_grouped(config, p, tokens, pos, seg, group=G, prefix=P)

        def loss(p, fn):
            valid = (seg[:, P:] > 0)[..., None]
            h = fn(p)
            return jnp.sum(jnp.where(valid, jnp.tanh(h), 0.0) ** 2 * weights[..., None]), h

        grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
        ((v0, h0), g0), ((v1, h1), g1) = grad(params, full), grad(params, grouped)
    valid = np.asarray(seg[:, P:]) > 0
    np.testing.assert_allclose(np.asarray(h1)[valid], np.asarray(h0)[valid], rtol=0, atol=1e-6)
    np.testing.assert_allclose(v1, v0, rtol=1e-9)
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale), g1, g0)
