"""ShardingRules presets (golden PartitionSpecs for every tiny-model parameter), collisions,
non-divisible dimensions, batch/activation helpers and the to_global round trip."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign import models
from jaxalign.sharding import (
    ShardingRules,
    batch_spec,
    logical_to_spec,
    make_mesh,
    named_shardings,
    shard_params,
    to_global,
    with_logical_constraint,
)

DF = ("data", "fsdp")

# Golden specs for tiny-64 (V=512, D=64, L=2, N=4, K=2, H=16, F=128), mesh data=1 fsdp=2 tensor=4.
# K=2 kv heads are not divisible by tensor=4, so fsdp_tp replicates that dimension (see rules.py).
GOLDEN = {
    "dp": {
        "['embed']['embedding']": (None, None),
        "['final_norm']['scale']": (None,),
        "['layers']['attn']['k_proj']['kernel']": (None, None, None, None),
        "['layers']['attn']['o_proj']['kernel']": (None, None, None, None),
        "['layers']['attn']['q_proj']['kernel']": (None, None, None, None),
        "['layers']['attn']['v_proj']['kernel']": (None, None, None, None),
        "['layers']['attn_norm']['scale']": (None, None),
        "['layers']['mlp']['down_proj']['kernel']": (None, None, None),
        "['layers']['mlp']['gate_proj']['kernel']": (None, None, None),
        "['layers']['mlp']['up_proj']['kernel']": (None, None, None),
        "['layers']['mlp_norm']['scale']": (None, None),
        "['unembed']['kernel']": (None, None),
    },
    "fsdp": {
        "['embed']['embedding']": (None, "fsdp"),
        "['final_norm']['scale']": ("fsdp",),
        "['layers']['attn']['k_proj']['kernel']": (None, "fsdp", None, None),
        "['layers']['attn']['o_proj']['kernel']": (None, None, None, "fsdp"),
        "['layers']['attn']['q_proj']['kernel']": (None, "fsdp", None, None),
        "['layers']['attn']['v_proj']['kernel']": (None, "fsdp", None, None),
        "['layers']['attn_norm']['scale']": (None, "fsdp"),
        "['layers']['mlp']['down_proj']['kernel']": (None, None, "fsdp"),
        "['layers']['mlp']['gate_proj']['kernel']": (None, "fsdp", None),
        "['layers']['mlp']['up_proj']['kernel']": (None, "fsdp", None),
        "['layers']['mlp_norm']['scale']": (None, "fsdp"),
        "['unembed']['kernel']": ("fsdp", None),
    },
    "fsdp_tp": {
        "['embed']['embedding']": ("tensor", "fsdp"),
        "['final_norm']['scale']": ("fsdp",),
        "['layers']['attn']['k_proj']['kernel']": (None, "fsdp", None, None),
        "['layers']['attn']['o_proj']['kernel']": (None, "tensor", None, "fsdp"),
        "['layers']['attn']['q_proj']['kernel']": (None, "fsdp", "tensor", None),
        "['layers']['attn']['v_proj']['kernel']": (None, "fsdp", None, None),
        "['layers']['attn_norm']['scale']": (None, "fsdp"),
        "['layers']['mlp']['down_proj']['kernel']": (None, "tensor", "fsdp"),
        "['layers']['mlp']['gate_proj']['kernel']": (None, "fsdp", "tensor"),
        "['layers']['mlp']['up_proj']['kernel']": (None, "fsdp", "tensor"),
        "['layers']['mlp_norm']['scale']": (None, "fsdp"),
        "['unembed']['kernel']": ("fsdp", "tensor"),
    },
}


def _flat_specs(shardings):
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {jax.tree_util.keystr(path): tuple(s.spec) for path, s in flat}


@pytest.fixture(scope="module")
def tiny():
    config = models.get_preset("tiny-64")
    shapes = models.abstract_params(config)
    return config, models.param_logical_axes(config), shapes


@pytest.mark.parametrize("preset", ["dp", "fsdp", "fsdp_tp"])
def test_preset_golden_specs_for_every_tiny_param(tiny, preset):
    _, axes, shapes = tiny
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    shardings = named_shardings(mesh, ShardingRules.preset(preset), axes, shapes)
    assert _flat_specs(shardings) == GOLDEN[preset]


def test_fsdp_tp_without_shapes_keeps_kv_heads_on_tensor(tiny):
    _, axes, _ = tiny
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    specs = _flat_specs(named_shardings(mesh, ShardingRules.preset("fsdp_tp"), axes))
    assert specs["['layers']['attn']['k_proj']['kernel']"] == (None, "fsdp", "tensor", None)


def test_kv_heads_stay_on_tensor_when_divisible(tiny):
    _, axes, shapes = tiny
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    specs = _flat_specs(named_shardings(mesh, ShardingRules.preset("fsdp_tp"), axes, shapes))
    assert specs["['layers']['attn']['k_proj']['kernel']"] == (None, "fsdp", "tensor", None)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3"])
def test_other_tiny_presets_cover_every_param(name):
    config = models.get_preset(name)
    shapes = models.abstract_params(config)
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    specs = _flat_specs(
        named_shardings(
            mesh, ShardingRules.preset("fsdp_tp"), models.param_logical_axes(config), shapes
        )
    )
    flat_shapes = {
        jax.tree_util.keystr(p): s.shape for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]
    }
    assert specs.keys() == flat_shapes.keys()
    for key, spec in specs.items():
        assert len(spec) == len(flat_shapes[key]), key
    if config.qkv_bias:
        assert specs["['layers']['attn']['q_proj']['bias']"] == (None, "tensor", None)
        assert specs["['layers']['attn']['k_proj']['bias']"] == (None, None, None)
    if config.qk_norm:
        assert specs["['layers']['attn']['q_norm']['scale']"] == (None, None)


def test_sharded_forward_matches_unsharded(tiny):
    config, axes, _ = tiny
    params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 8), 0, config.vocab_size)
    expected = jax.jit(models.forward, static_argnums=0)(config, params, tokens)
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    rules = ShardingRules.preset("fsdp_tp")
    sharded = shard_params(params, mesh, rules, axes)
    assert sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    tokens = jax.device_put(tokens, NamedSharding(mesh, batch_spec(rules)))
    got = jax.jit(models.forward, static_argnums=0)(config, sharded, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_collision_names_both_logical_axes():
    rules = ShardingRules.preset("fsdp")
    with pytest.raises(ValueError, match=r"'batch' and 'embed'.*mesh axis 'fsdp'"):
        logical_to_spec(("batch", "seq", "embed"), rules)
    custom = ShardingRules(heads="tensor", mlp=("fsdp", "tensor"))
    with pytest.raises(ValueError, match=r"'heads' and 'mlp'.*'tensor'"):
        logical_to_spec(("heads", "mlp"), custom)
    with pytest.raises(ValueError, match=r"'embed' and 'embed'"):
        logical_to_spec(("embed", "embed"), rules)


def test_activation_axes_do_not_collide():
    rules = ShardingRules.preset("fsdp_tp")
    assert logical_to_spec(("batch", "seq", "act_embed"), rules) == P(DF, None, None)
    assert logical_to_spec(("batch", "seq", "heads", "head_dim"), rules) == P(
        DF, None, "tensor", None
    )
    assert logical_to_spec(("batch", "seq", "vocab"), rules) == P(DF, None, "tensor")


def test_non_divisible_dims_fall_back():
    rules = ShardingRules.preset("fsdp_tp")
    mesh = {"data": 2, "fsdp": 2, "tensor": 4}
    # kv_heads 2 over tensor 4: replicated.
    spec = logical_to_spec(("embed", "kv_heads"), rules, shape=(64, 2), mesh=mesh)
    assert spec == P("fsdp", None)
    # 6 rows over data*fsdp = 4: keep the prefix "data" (6 % 2 == 0).
    assert logical_to_spec(("batch", None), rules, shape=(6, 3), mesh=mesh) == P("data", None)
    # 3 rows: not even "data" divides it -> replicated.
    assert logical_to_spec(("batch", None), rules, shape=(3, 3), mesh=mesh) == P(None, None)
    # the fallback can never create a collision, only remove axes
    assert logical_to_spec(("batch", "kv_heads"), rules, shape=(8, 2), mesh=mesh) == P(DF, None)


def test_named_shardings_accepts_shape_tuples():
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    axes = {"b": {"k": ("embed", "kv_heads")}, "a": ("vocab", "embed")}
    shapes = {"a": (512, 64), "b": {"k": (64, 2)}}
    specs = _flat_specs(named_shardings(mesh, ShardingRules.preset("fsdp_tp"), axes, shapes))
    assert specs == {"['a']": ("tensor", "fsdp"), "['b']['k']": ("fsdp", None)}


def test_non_divisible_param_is_placeable():
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    rules = ShardingRules.preset("fsdp_tp")
    x = np.arange(2 * 64 * 2 * 16, dtype=np.float32).reshape(2, 64, 2, 16)
    axes = {"k": ("layers", "embed", "kv_heads", "head_dim")}
    out = shard_params({"k": x}, mesh, rules, axes)["k"]
    assert out.sharding.spec == P(None, "fsdp", None, None)
    np.testing.assert_array_equal(np.asarray(out), x)


def test_rules_validation_and_from_dict():
    with pytest.raises(ValueError, match=r"unknown sharding preset 'zero3'"):
        ShardingRules.preset("zero3")
    with pytest.raises(ValueError, match=r"'heads' maps to unknown mesh axes \['model'\]"):
        ShardingRules(heads="model")
    with pytest.raises(ValueError, match=r"unknown logical axis 'embd'"):
        logical_to_spec(("embd",), ShardingRules())
    with pytest.raises(ValueError, match=r"unknown logical axes \['embd'\]"):
        ShardingRules.from_dict({"embd": "fsdp"})
    rules = ShardingRules.from_dict({"vocab": ["tensor"], "batch": ["data"]}, base="fsdp")
    assert rules == dataclasses.replace(ShardingRules.preset("fsdp"), vocab="tensor", batch="data")
    assert hash(rules) == hash(dataclasses.replace(rules))
    with pytest.raises(ValueError, match=r"rank 2 but shape is \(3,\)"):
        logical_to_spec(("batch", None), rules, shape=(3,), mesh={"data": 1})


def test_batch_spec():
    assert batch_spec(ShardingRules.preset("dp")) == P(DF, None)
    assert batch_spec(ShardingRules(batch="data"), ndim=3) == P("data", None, None)


def _batch(rows=8, t=16):
    rng = np.random.default_rng(0)
    return {
        "tokens": rng.integers(0, 512, (rows, t), dtype=np.int32),
        "loss_mask": (rng.random((rows, t)) > 0.5).astype(np.float32),
        "example_mask": np.ones((rows // 2,), np.float32),
        "num_pairs": np.int32(rows // 2),
    }


def test_to_global_round_trip_on_8_devices():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = ShardingRules.preset("fsdp_tp")
    local = _batch()
    out = to_global(local, mesh, rules)
    assert out.keys() == local.keys()
    for key, value in local.items():
        np.testing.assert_array_equal(np.asarray(out[key]), value)
        assert out[key].dtype == value.dtype
    assert out["tokens"].sharding.spec == P(DF, None)
    assert out["example_mask"].sharding.spec == P(DF)
    assert out["num_pairs"].sharding.spec == P()
    # 4 row shards, each held twice (tensor=2): each device holds 2 distinct rows.
    for shard in out["tokens"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), local["tokens"][shard.index])
        assert shard.data.shape == (2, 16)


def test_to_global_rejects_rows_not_divisible():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match=r"'tokens'.*6 rows.*4 row shards"):
        to_global({"tokens": np.zeros((6, 4), np.int32)}, mesh, ShardingRules())


def test_with_logical_constraint():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = ShardingRules.preset("fsdp_tp")
    x = jnp.ones((8, 4, 16))

    def f(x):
        return with_logical_constraint(x * 2, ("batch", "seq", "act_embed"), rules)

    # no active mesh: a no-op, so models run unsharded on one device
    assert jax.jit(f)(x).sharding.is_fully_replicated
    with jax.set_mesh(mesh):
        y = jax.jit(f)(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(DF, None, None)), 3)
    z = jax.jit(lambda x: with_logical_constraint(x, ("batch", "seq", "mlp"), rules, mesh))(x)
    assert z.sharding.is_equivalent_to(NamedSharding(mesh, P(DF, None, "tensor")), 3)
    with pytest.raises(ValueError, match=r"'batch' and 'embed'"):
        jax.jit(lambda x: with_logical_constraint(x, ("batch", "seq", "embed"), rules, mesh))(x)
