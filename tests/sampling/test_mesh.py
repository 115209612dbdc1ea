"""Generation on 8 fake devices gives the tokens of one device.

Params are placed in their training shardings (`shard_params` with the "fsdp" and "fsdp_tp"
presets) and used as they are; rows run over (data, fsdp), the caches' kv heads over tensor. Only
the order of float32 reductions changes (sharded matmuls), so the tokens must be equal (greedy and
sampled: the sampler's random bits do not depend on the sharding) and the log-probs agree to
float32 rounding (1e-5).
"""

import jax
import numpy as np
import pytest

from jaxalign import models as M
from jaxalign.sampling import SamplingOptions, engine, generate, prompts_from_ids
from jaxalign.sharding import ShardingRules, make_mesh, shard_params

PAD = 3
PROMPTS = [[1, 45, 12, 99, 7], [1, 300, 301], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 2, 9]]
GREEDY = SamplingOptions(max_new_tokens=10, n=2, temperature=0.0, eos_id=2, pad_id=PAD)
SAMPLED = SamplingOptions(
    max_new_tokens=10, n=2, temperature=0.8, top_p=0.95, top_k=50, eos_id=2, pad_id=PAD
)
MESHES = {
    "fsdp8": ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
    "fsdp4-tensor2": ({"data": 1, "fsdp": 4, "tensor": 2}, "fsdp_tp"),
}


@pytest.fixture(scope="module")
def setup():
    config = M.get_preset("tiny-64")
    params = M.init_params(config, jax.random.key(0))
    params["unembed"]["kernel"] = params["unembed"]["kernel"] * 20.0
    params = jax.device_put(params, jax.devices()[0])
    prompts = prompts_from_ids(PROMPTS, PAD)
    one = {
        opts.temperature: generate(config, params, prompts, rng=jax.random.key(1), options=opts)
        for opts in (GREEDY, SAMPLED)
    }
    return config, params, prompts, one


def _same(result, want):
    np.testing.assert_array_equal(result.tokens, want.tokens)
    np.testing.assert_array_equal(result.lengths, want.lengths)
    np.testing.assert_array_equal(result.finish_reason, want.finish_reason)
    np.testing.assert_allclose(result.logprobs, want.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(result.policy_logprobs, want.policy_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_gives_the_tokens_of_one_device(setup, name):
    config, params, prompts, one = setup
    shape, preset = MESHES[name]
    mesh, rules = make_mesh(shape), ShardingRules.preset(preset)
    sharded = shard_params(params, mesh, rules, M.param_logical_axes(config))
    kernel = sharded["layers"]["attn"]["k_proj"]["kernel"]  # [L, D, K, H]
    assert kernel.sharding.spec[1] == "fsdp"
    if preset == "fsdp_tp":
        assert kernel.sharding.spec[2] == "tensor"
    for opts in (GREEDY, SAMPLED):
        result = generate(
            config, sharded, prompts, rng=jax.random.key(1), options=opts, mesh=mesh, rules=rules
        )
        _same(result, one[opts.temperature])
    assert sharded["layers"]["attn"]["k_proj"]["kernel"].sharding == kernel.sharding


def test_mesh_is_taken_from_the_params_when_not_given(setup):
    config, params, prompts, one = setup
    mesh = make_mesh({"fsdp": 8})
    sharded = shard_params(params, mesh, ShardingRules.preset("fsdp"), M.param_logical_axes(config))
    result = generate(config, sharded, prompts, rng=jax.random.key(1), options=SAMPLED)
    _same(result, one[SAMPLED.temperature])


def test_cache_rows_and_kv_heads_are_sharded_as_the_rules_say(setup):
    """The loop's cache [L, R, S, K, H] is constrained to rows over (data, fsdp) and kv heads
    over tensor under "fsdp_tp" (read from the lowered program; nothing is compiled)."""
    config, params, prompts, _ = setup
    mesh, rules = make_mesh({"fsdp": 4, "tensor": 2}), ShardingRules.preset("fsdp_tp")
    sharded = shard_params(params, mesh, rules, M.param_logical_axes(config))
    placed, n = engine._place(
        {k: np.asarray(prompts[k], np.int32) for k in engine.PROMPT_KEYS}, 2, mesh, rules
    )
    text = engine._decode_loop.lower(
        (sharded,),
        placed,
        jax.random.key(1),
        engine.knobs(GREEDY),
        (),
        configs=(config,),
        combine=None,
        max_new_tokens=10,
        n=n,
        mesh=mesh,
        rules=rules,
    ).as_text()
    L, R, S, K, H = config.n_layers, 8, 16 + 10, config.n_kv_heads, config.head_dim
    cache = f"tensor<{L}x{R}x{S}x{K}x{H}xf32>"
    spec = '[{}, {"data", "fsdp"}, {}, {"tensor"}, {}]'
    lines = [line for line in text.splitlines() if "sharding_constraint" in line and cache in line]
    assert lines and all(spec in line for line in lines), lines
