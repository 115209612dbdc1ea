"""LoRA adapters: the adapted forward against float64 NumPy written from the formula
y = x W + (alpha / r) (x A) B, values and gradients; init equals the base; dropout; merge;
sampling path; logical axes and shardings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import models as M
from jaxalign import sharding

LORA = M.LoraConfig(rank=4, alpha=8.0, targets="proj")  # all seven projections
RNG = np.random.default_rng(0)


def _configs(preset="tiny-gemma3", lora=LORA, **changes):
    base = M.get_preset(preset, **changes)
    return base, base.replace(lora=lora)


def _random_adapters(config, seed=1, scale=0.3):
    """Adapters with B != 0 too (init has B = 0), from NumPy."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype),
        M.abstract_adapters(config),
    )


def _numpy_merge(config, params, adapters):
    """W + (alpha / r) A B per layer, float64, written with einsum (not `merge_adapters`)."""
    s = config.lora.alpha / config.lora.rank
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    for block, modules in adapters["layers"].items():
        for name, ab in modules.items():
            a = np.asarray(ab["lora_a"], np.float64)  # [L, *in, r]
            b = np.asarray(ab["lora_b"], np.float64)  # [L, r, *out]
            k = out["layers"][block][name]["kernel"]
            a2 = a.reshape(a.shape[0], -1, a.shape[-1])
            b2 = b.reshape(b.shape[0], b.shape[1], -1)
            delta = np.einsum("lir,lro->lio", a2, b2).reshape(k.shape)
            out["layers"][block][name]["kernel"] = k + s * delta
    return out


def test_init_params_and_the_base_forward_ignore_lora():
    base, adapted = _configs()
    p = M.init_params(base, jax.random.key(0))
    q = M.init_params(adapted, jax.random.key(0))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), p, q))
    assert jax.tree.structure(M.abstract_params(adapted)) == jax.tree.structure(p)
    tokens = RNG.integers(0, base.vocab_size, (2, 9))
    np.testing.assert_array_equal(  # no adapters attached: the base model, whatever the config
        M.forward(adapted, p, tokens), M.forward(base, p, tokens)
    )


def test_init_adapters_b_zero_a_uniform_and_forward_equals_base():
    base, adapted = _configs()
    params = M.init_params(base, jax.random.key(0))
    adapters = M.init_adapters(adapted, jax.random.key(1))
    for block, modules in adapters["layers"].items():
        for name, ab in modules.items():
            assert not np.any(ab["lora_b"]), (block, name)
            a = np.asarray(ab["lora_a"])
            bound = 1 / np.sqrt(np.prod(a.shape[1:-1]))
            assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    tokens = RNG.integers(0, base.vocab_size, (2, 9))
    want = M.forward(base, params, tokens)
    got = M.forward(adapted, M.attach(params, adapters), tokens)
    # B = 0 adds exact zeros; the programs differ, so XLA may fuse the base matmuls differently.
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert M.adapter_count(adapted) == sum(a.size for a in jax.tree.leaves(adapters))


@pytest.mark.parametrize("preset", ["tiny-gemma3", "tiny-qwen2", "tiny-64"])
def test_adapted_forward_equals_the_dense_merged_model_float64(preset):
    """x64: the adapter-aware forward equals the base forward on W + (alpha/r) A B (NumPy)."""
    with jax.enable_x64(True):
        base, adapted = _configs(preset, dtype="float64", param_dtype="float64")
        params = M.init_params(base, jax.random.key(0))
        adapters = _random_adapters(adapted)
        tokens = RNG.integers(0, base.vocab_size, (2, 11))
        got = M.forward(adapted, M.attach(params, adapters), tokens)
        dense = M.forward(base, _numpy_merge(adapted, params, adapters), tokens)
        np.testing.assert_allclose(got, dense, rtol=1e-10, atol=1e-10)
        assert np.abs(np.asarray(got) - np.asarray(M.forward(base, params, tokens))).max() > 1e-2
        merged = M.merge_adapters(adapted, params, adapters)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12),
            merged,
            _numpy_merge(adapted, params, adapters),
        )


def test_targets_pick_the_modules_and_only_those():
    base, adapted = _configs(lora=M.LoraConfig(rank=2, alpha=2.0, targets="q_proj|v_proj"))
    assert adapted.lora.modules() == ("attn.q_proj", "attn.v_proj")
    tree = M.abstract_adapters(adapted)
    assert set(tree["layers"]) == {"attn"} and set(tree["layers"]["attn"]) == {"q_proj", "v_proj"}
    L, D, N, H = base.n_layers, base.d_model, base.n_heads, base.head_dim
    assert tree["layers"]["attn"]["q_proj"]["lora_a"].shape == (L, D, 2)
    assert tree["layers"]["attn"]["q_proj"]["lora_b"].shape == (L, 2, N, H)
    mlp = M.LoraConfig(rank=2, alpha=2.0, targets=r"^mlp\.").modules()
    assert mlp == ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0, alpha=1.0), "rank=0"),
        (dict(rank=2, alpha=1.0, dropout=1.0), "dropout=1.0"),
        (dict(rank=2, alpha=1.0, targets="qproj"), "matches none"),
        (dict(rank=2, alpha=1.0, targets="("), "not a regex"),
    ],
)
def test_bad_lora_configs_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.LoraConfig(**kwargs)


def _o_proj(dropout=0.0):
    """A standalone adapted o_proj (two input axes N, H): the Dense with the most axes."""
    lora = M.LoraConfig(rank=3, alpha=6.0, dropout=dropout, targets="o_proj")
    dense = M.Dense(
        (4, 5),
        (6,),
        ("heads", "head_dim"),
        ("embed",),
        use_bias=False,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
        rngs=nnx.Rngs(0),
        lora=lora,
    )
    rng = np.random.default_rng(2)
    dense.lora_a[...] = jnp.asarray(rng.standard_normal((4, 5, 3)))
    dense.lora_b[...] = jnp.asarray(rng.standard_normal((3, 6)))
    return dense, lora


def test_dense_values_and_gradients_against_numpy():
    """y = x W + s (x A) B; for L = sum(y * G): dA = s x^T (G B^T), dB = s (x A)^T G, dx too."""
    with jax.enable_x64(True):
        dense, lora = _o_proj()
        graphdef, state = nnx.split(dense)
        rng = np.random.default_rng(3)
        x = rng.standard_normal((2, 7, 4, 5))
        G = rng.standard_normal((2, 7, 6))

        def loss(state, x):
            return jnp.sum(nnx.merge(graphdef, state)(x) * G)

        W = np.asarray(dense.kernel[...]).reshape(20, 6)
        A = np.asarray(dense.lora_a[...]).reshape(20, 3)
        B = np.asarray(dense.lora_b[...])
        s = lora.alpha / lora.rank
        xf = x.reshape(14, 20)
        y = xf @ W + s * (xf @ A) @ B
        np.testing.assert_allclose(dense(jnp.asarray(x)).reshape(14, 6), y, rtol=1e-12)
        grads, dx = jax.grad(loss, argnums=(0, 1))(state, jnp.asarray(x))
        Gf = G.reshape(14, 6)
        np.testing.assert_allclose(grads["lora_a"][...].reshape(20, 3), s * xf.T @ (Gf @ B.T))
        np.testing.assert_allclose(grads["lora_b"][...], s * (xf @ A).T @ Gf, rtol=1e-12)
        want_dx = Gf @ W.T + s * (Gf @ B.T) @ A.T
        np.testing.assert_allclose(dx.reshape(14, 20), want_dx, rtol=1e-12)


def test_dropout_drops_adapter_inputs_only_and_scales_the_kept():
    """With W = 0 and A = e_0 e_0^T a row's output is s (m_0 x_0 / (1 - p)) B[0], m_0 its mask of
    input 0: 0 or the undropped value / (1 - p), kept with probability 1 - p. With B = 0 the
    output is the base, dropout or not."""
    with jax.enable_x64(True):
        dense, lora = _o_proj(dropout=0.25)
        dense.kernel[...] = jnp.zeros_like(dense.kernel[...])
        dense.lora_a[...] = jnp.zeros((4, 5, 3)).at[0, 0, 0].set(1.0)
        x = jnp.ones((4000, 4, 5))
        full = np.asarray(dense(x))  # no key: no dropout
        row = np.asarray(dense.lora_b[...])[0] * lora.alpha / lora.rank
        np.testing.assert_allclose(full, np.broadcast_to(row, full.shape), rtol=1e-12)
        dropped = np.asarray(dense(x, jax.random.key(0)))
        kept = np.abs(dropped).sum(axis=1) > 0
        np.testing.assert_allclose(dropped[kept], full[kept] / 0.75, rtol=1e-12)
        np.testing.assert_array_equal(dropped[~kept], 0.0)
        assert abs(kept.mean() - 0.75) < 0.03  # 4000 draws: std 0.007
        assert not np.array_equal(dropped, np.asarray(dense(x, jax.random.key(1))))
        dense.lora_b[...] = jnp.zeros_like(dense.lora_b[...])
        dense.kernel[...] = jnp.ones_like(dense.kernel[...])
        np.testing.assert_array_equal(dense(x, jax.random.key(0)), dense(x))


def test_dropout_key_in_the_params_changes_only_training_forwards():
    base, _ = _configs()
    adapted = base.replace(lora=LORA.__class__(rank=4, alpha=8.0, dropout=0.5, targets="proj"))
    params = M.init_params(base, jax.random.key(0))
    adapters = _random_adapters(adapted, scale=0.1)
    tokens = RNG.integers(0, base.vocab_size, (2, 9))
    plain = M.forward(adapted, M.attach(params, adapters), tokens)
    one = M.forward(adapted, M.attach(params, adapters, jax.random.key(0)), tokens)
    again = M.forward(adapted, M.attach(params, adapters, jax.random.key(0)), tokens)
    np.testing.assert_array_equal(one, again)
    assert np.abs(np.asarray(one) - np.asarray(plain)).max() > 1e-3


def test_cache_decode_with_adapters_equals_the_full_forward():
    """The sampling path (prefill + one token at a time) runs the adapters too."""
    base, adapted = _configs()
    params = M.attach(M.init_params(base, jax.random.key(0)), _random_adapters(adapted))
    tokens = jnp.asarray(RNG.integers(0, base.vocab_size, (2, 10)))
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    full = M.forward(adapted, params, tokens)
    cache = M.init_cache(adapted, 2, 10)
    hidden, cache = M.forward_with_cache(adapted, params, tokens[:, :6], positions[:, :6], cache)
    steps = [hidden]
    for t in range(6, 10):
        h, cache = M.forward_with_cache(
            adapted, params, tokens[:, t : t + 1], positions[:, t : t + 1], cache
        )
        steps.append(h)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=0)


def test_adapter_axes_shard_like_their_base_matrix():
    _, adapted = _configs()
    axes = M.adapter_logical_axes(adapted)
    assert axes["layers"]["attn"]["q_proj"] == {
        "lora_a": ("layers", "embed", None),
        "lora_b": ("layers", None, "heads", "head_dim"),
    }
    assert axes["layers"]["mlp"]["down_proj"] == {
        "lora_a": ("layers", "mlp", None),
        "lora_b": ("layers", None, "embed"),
    }
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    rules = sharding.ShardingRules.preset("fsdp_tp")
    specs = sharding.named_shardings(mesh, rules, axes, M.abstract_adapters(adapted))
    assert tuple(specs["layers"]["attn"]["q_proj"]["lora_a"].spec) == (None, "fsdp", None)
    assert tuple(specs["layers"]["attn"]["q_proj"]["lora_b"].spec) == (None, None, "tensor", None)
    assert tuple(specs["layers"]["mlp"]["down_proj"]["lora_a"].spec) == (None, "tensor", None)
    assert tuple(specs["layers"]["mlp"]["down_proj"]["lora_b"].spec) == (None, None, "fsdp")


def test_adapters_need_a_lora_config():
    base, adapted = _configs()
    params = M.init_params(base, jax.random.key(0))
    with pytest.raises(ValueError, match="ModelConfig.lora is None"):
        M.forward(base, M.attach(params, _random_adapters(adapted)), jnp.zeros((1, 3), jnp.int32))
