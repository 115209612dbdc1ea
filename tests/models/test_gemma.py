"""Gemma 2 / Gemma 3 decoders: float64 NumPy reference, transformers parity (logits, packed rows,
KV-cache decode), local/global layer data, embedding scale, presets' structure."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import models as M

GEMMA = ["tiny-gemma2", "tiny-gemma3"]

_forward = jax.jit(M.forward, static_argnums=0)
_logits = jax.jit(M.logits, static_argnums=0)
_init = jax.jit(M.init_params, static_argnums=0)
_step = jax.jit(M.forward_with_cache, static_argnums=0)


@functools.lru_cache
def _params(name):
    """Random params with every weight perturbed (norm weights away from 0, kernels large enough
    that the soft-caps bite), shared by the tests of this file."""
    config = M.get_preset(name)
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32),
        _init(config, jax.random.key(0)),
    )


def _tokens(config, shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, config.vocab_size, jnp.int32)


def _reference(config, params, tokens):
    """Float64 NumPy Gemma 2/3, one unpacked batch, written from the papers / HF modeling code:
    (1 + w) RMSNorm, sandwich norms, sqrt(D) embedding, GeGLU-tanh, q/k norm, query scaling by
    query_pre_attn_scalar^-1/2, soft-caps, every P-th layer global, local RoPE base. Returns the
    final-normed hidden states and the (capped) logits."""
    c = config
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    B, T = tokens.shape
    N, K, H = c.n_heads, c.n_kv_heads, c.head_dim

    def rms(x, w):
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + c.norm_eps) * (1 + w)

    def cap(x, cap):
        return x if cap is None else cap * np.tanh(x / cap)

    def rope(x, theta, factor):  # [B, T, n, H], rotate-half
        inv_freq = 1.0 / theta ** (np.arange(0, H, 2) / H) / factor
        ang = np.arange(T)[:, None] * inv_freq[None]
        ang = np.concatenate([ang, ang], -1)[None, :, None]
        half = np.concatenate([-x[..., H // 2 :], x[..., : H // 2]], -1)
        return x * np.cos(ang) + half * np.sin(ang)

    x = p["embed"]["embedding"][np.asarray(tokens)] * math.sqrt(c.d_model)
    i, j = np.indices((T, T))
    for layer in range(c.n_layers):
        lp = jax.tree.map(lambda a, n=layer: a[n], p["layers"])
        a = lp["attn"]
        local = (layer + 1) % c.sliding_window_pattern != 0
        if local and c.rope_local_theta is not None:
            theta, factor = c.rope_local_theta, 1.0
        else:
            theta = c.rope_theta
            factor = 1.0 if c.rope_scaling is None else c.rope_scaling.factor  # linear
        h = rms(x, lp["attn_norm"]["scale"])
        q = np.einsum("btd,dnh->btnh", h, a["q_proj"]["kernel"])
        k = np.einsum("btd,dkh->btkh", h, a["k_proj"]["kernel"])
        v = np.einsum("btd,dkh->btkh", h, a["v_proj"]["kernel"])
        if c.qk_norm:
            q, k = rms(q, a["q_norm"]["scale"]), rms(k, a["k_norm"]["scale"])
        q, k = rope(q, theta, factor), rope(k, theta, factor)
        k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
        s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(c.query_pre_attn_scalar)
        s = cap(s, c.attn_logit_softcap)
        allowed = (j <= i) & ((i - j < c.sliding_window) if local else True)
        s = np.where(allowed, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bnts,bsnh->btnh", w, v)
        x = x + rms(
            np.einsum("btnh,nhd->btd", o, a["o_proj"]["kernel"]), lp["attn_post_norm"]["scale"]
        )
        h = rms(x, lp["mlp_norm"]["scale"])
        m = lp["mlp"]
        g = h @ m["gate_proj"]["kernel"]
        gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
        y = (gelu * (h @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
        x = x + rms(y, lp["mlp_post_norm"]["scale"])
    hidden = rms(x, p["final_norm"]["scale"])
    return hidden, cap(hidden @ p["embed"]["embedding"].T, c.final_logit_softcap)


@pytest.mark.parametrize("name", GEMMA)
def test_matches_numpy_reference(name):
    # Small caps so that both soft-caps change the result (checked below).
    config = M.get_preset(name, attn_logit_softcap=2.0, final_logit_softcap=3.0)
    params = _params(name)
    tokens = _tokens(config, (2, 12))  # longer than the window (4) of the local layers
    hidden = _forward(config, params, tokens)
    want_hidden, want_logits = _reference(config, params, tokens)
    np.testing.assert_allclose(hidden, want_hidden, rtol=0, atol=2e-4)
    got_logits = _logits(config, params, hidden)
    np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=2e-4)
    uncapped = config.replace(attn_logit_softcap=None, final_logit_softcap=None)
    assert np.abs(_forward(uncapped, params, tokens) - hidden).max() > 0.1
    assert np.abs(got_logits).max() < 3.0 < np.abs(_logits(uncapped, params, hidden)).max()


def test_layer_data_follows_the_pattern():
    g2, g3 = M.get_preset("gemma2-9b"), M.get_preset("gemma3-4b")
    np.testing.assert_array_equal(M.local_layers(g2), np.arange(42) % 2 == 0)  # HF: even slide
    np.testing.assert_array_equal(M.local_layers(g3), np.arange(34) % 6 != 5)  # 5 local : 1
    freq = M.layer_inv_freq(g3)
    local = M.rope_inv_freq(256, 10000.0)
    np.testing.assert_allclose(freq[0], local, rtol=1e-15)
    np.testing.assert_allclose(freq[5], M.rope_inv_freq(256, 1e6) / 8, rtol=1e-15)
    assert not M.local_layers(M.get_preset("llama3-8b")).any()
    assert M.local_layers(M.get_preset("tiny-qwen2", sliding_window=3)).all()
    # Per-layer flags are data derived from the config, never parameters.
    leaves = jax.tree.leaves(M.abstract_params(M.get_preset("tiny-gemma3")))
    assert all(x.dtype == jnp.float32 for x in leaves)
    assert sum(x.size for x in leaves) == M.param_count(M.get_preset("tiny-gemma3"))


def test_receptive_field_of_local_and_global_layers():
    """Only local layers: token 0 reaches L * (W - 1) positions; any global layer: all."""
    config = M.get_preset("tiny-gemma2", sliding_window=3)
    params = _params("tiny-gemma2")
    tokens = _tokens(config, (1, 12))
    changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % config.vocab_size)

    def reach(c):
        diff = np.abs(_forward(c, params, tokens) - _forward(c, params, changed)).max(-1)[0]
        return int(np.sum(diff > 1e-5))

    assert reach(config.replace(sliding_window_pattern=None)) == 1 + 4 * 2
    assert reach(config) == 12


@pytest.mark.parametrize("name", GEMMA)
def test_init_and_structure(name):
    config = M.get_preset(name)
    params = _init(config, jax.random.key(0))
    layers = params["layers"]
    for norm in ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm"):
        assert not np.any(layers[norm]["scale"]), norm  # (1 + w) norms start at w = 0
    assert not np.any(params["final_norm"]["scale"])
    assert ("q_norm" in layers["attn"]) == config.qk_norm and "unembed" not in params
    axes = M.param_logical_axes(config)
    assert axes["layers"]["attn_post_norm"]["scale"] == ("layers", "embed")
    assert axes["layers"]["mlp_post_norm"]["scale"] == ("layers", "embed")


def test_embed_scale_rounds_like_transformers():
    """HF multiplies by sqrt(D) cast to the activation dtype: sqrt(3072) = 55.43 -> 55.5 in
    bfloat16, so bf16 embeddings are exactly bf16(row) * 55.5."""
    from flax import nnx

    config = M.get_preset("tiny-gemma2", d_model=3072, vocab_size=4, dtype="bfloat16")
    embed = M.Embed(config, rngs=nnx.Rngs(0))
    out = embed(jnp.arange(4)[None])
    assert out.dtype == jnp.bfloat16
    table = embed.embedding[...].astype(jnp.bfloat16)
    np.testing.assert_array_equal(out[0], table * jnp.bfloat16(55.5))
    f32 = M.Embed(config.replace(dtype="float32"), rngs=nnx.Rngs(0))(jnp.arange(4)[None])
    np.testing.assert_array_equal(f32[0], embed.embedding[...] * np.float32(math.sqrt(3072)))


@pytest.mark.parametrize("name", GEMMA)
def test_packed_and_kv_cache_equal_full_forward(name):
    config = M.get_preset(name)
    params = _params(name)
    a, b = _tokens(config, (1, 7), seed=2), _tokens(config, (1, 6), seed=3)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
    segments = jnp.array([[1] * 7 + [2] * 6 + [0] * 3])
    positions = jnp.array([list(range(7)) + list(range(6)) + [0] * 3])
    out = _forward(config, params, packed, positions, segments)
    np.testing.assert_allclose(out[:, :7], _forward(config, params, a), atol=2e-5)
    np.testing.assert_allclose(out[:, 7:13], _forward(config, params, b), atol=2e-5)

    # Left-padded prompts of 5 and 3 tokens, then 6 decode steps (past the window of 4).
    lengths, T, steps = [5, 3], 5, 6
    rows = [_tokens(config, (n,), seed=10 + i) for i, n in enumerate(lengths)]
    tokens = jnp.stack([jnp.pad(r, (T - r.shape[0], 0)) for r in rows])
    seg = jnp.array([[0] * (T - n) + [1] * n for n in lengths])
    pos = jnp.array([[0] * (T - n) + list(range(n)) for n in lengths])
    cont = _tokens(config, (2, steps), seed=20)
    cache = M.init_cache(config, batch=2, max_len=T + steps)
    hidden, cache = _step(config, params, tokens, pos, cache, seg)
    decoded = []
    for t in range(steps):
        h, cache = _step(config, params, cont[:, t : t + 1], jnp.array(lengths)[:, None] + t, cache)
        decoded.append(h)
    decoded = jnp.concatenate(decoded, axis=1)
    for i, n in enumerate(lengths):
        full = _forward(config, params, jnp.concatenate([rows[i], cont[i]])[None])[0]
        np.testing.assert_allclose(hidden[i, T - n :], full[:n], atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(decoded[i], full[n:], atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- transformers parity

HF_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    query_pre_attn_scalar=24,
    sliding_window=4,
)


def _hf_cases():
    transformers = pytest.importorskip("transformers")
    return {
        "gemma2": transformers.Gemma2Config(
            **HF_TINY, num_hidden_layers=4, attn_logit_softcapping=2.0, final_logit_softcapping=3.0
        ),
        "gemma3": transformers.Gemma3TextConfig(
            **HF_TINY,
            num_hidden_layers=6,
            sliding_window_pattern=3,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            final_logit_softcapping=5.0,
        ),
    }


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """family -> (transformers model, jaxalign config, params), random weights, via save/load."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxalign.checkpoint import load_hf

    built = {}
    for family, hf_config in _hf_cases().items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config, attn_implementation="eager"
        )
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.3 * torch.randn_like(p))
        model.eval()
        directory = tmp_path_factory.mktemp("hf") / family
        model.save_pretrained(directory)
        built[family] = (model, *load_hf(directory))
    return built


def _hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        ids = torch.from_numpy(np.asarray(tokens, np.int64))
        return model(input_ids=ids).logits.numpy()


@pytest.mark.hf
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_matches_transformers_packed_and_decode(hf_models, family):
    model, config, params = hf_models[family]
    assert config.sliding_window == 4 and config.sliding_window_pattern in (2, 3)
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 13)).astype(np.int32)
    want = _hf_logits(model, tokens)
    got = _logits(config, params, _forward(config, params, tokens))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    # Packed row: sequences of 6 and 7 tokens with restarted positions.
    packed = np.concatenate([tokens[0, :6], tokens[1, :7]])[None]
    positions = np.array([list(range(6)) + list(range(7))], np.int32)
    segments = np.array([[1] * 6 + [2] * 7], np.int32)
    got = _logits(config, params, _forward(config, params, packed, positions, segments))[0]
    np.testing.assert_allclose(got[:6], _hf_logits(model, tokens[:1, :6])[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[6:], _hf_logits(model, tokens[1:, :7])[0], atol=1e-4, rtol=0)

    # Prefill 5 tokens, then decode 8 one at a time (past the window): equal to HF's full logits.
    cache = M.init_cache(config, batch=2, max_len=13)
    pos = np.broadcast_to(np.arange(13, dtype=np.int32), (2, 13))
    hidden, cache = _step(config, params, tokens[:, :5], pos[:, :5], cache)
    steps = [hidden]
    for t in range(5, 13):
        h, cache = _step(config, params, tokens[:, t : t + 1], pos[:, t : t + 1], cache)
        steps.append(h)
    decoded = _logits(config, params, jnp.concatenate(steps, axis=1))
    np.testing.assert_allclose(decoded, want, atol=1e-4, rtol=0)


@pytest.mark.hf
def test_training_logprobs_match_transformers(hf_models):
    """The training path (kernels with the model's final-logit cap) gives HF's log-probs."""
    import torch

    from jaxalign.train import objectives

    model, config, params = hf_models["gemma2"]
    tokens = np.random.default_rng(1).integers(0, 256, size=(2, 11)).astype(np.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10)),
        "segment_ids": np.ones((2, 10), np.int32),
        "loss_mask": np.ones((2, 10), np.float32),
    }
    got = jax.jit(objectives.token_logps, static_argnums=0)(config, params, batch)
    logp = torch.log_softmax(torch.from_numpy(_hf_logits(model, tokens[:, :-1])), -1).numpy()
    want = np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
