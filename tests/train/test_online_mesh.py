"""One online step (rollout, then the update) gives on 8 devices what it gives on one.

The real path: `setup(config)` with `config.mesh` / `config.sharding` overridden, the params in
their training shardings, and one step of the online loop (`jaxalign.train.online`): sample and
score a prompt batch (`rollout_step`), the family's update batch (`to_batch`: old / reference
log-probs, values, advantages), its minibatches and the jitted train step. GRPO takes one update
(one minibatch); PPO takes rl.epochs x rl.minibatches = 4 (value head, GAE, whitening, k1 KL in
the reward, reward scaling). The model is the tiny random init (no SFT: the test is about
sharding, not learning); the reward is a tent around a completion length in characters, so the
rewards of a group differ and every update is driven by real advantages.

Tolerances. Sharding changes only the order of float32 reductions:

- rollout tokens, lengths and finish reasons: equal (the sampler's random bits do not depend on
  the sharding, and a rounding difference of ~1e-6 in a logit flips a sampled token only if a
  Gumbel gap that small occurs: never on these rows), so the rewards are equal too;
- the sampler's log-probs and the trainer's old log-probs: ATOL_LOGP = 1e-5 absolute (log-probs
  of ~-6.5 summed over a 64-wide model in float32, as tests/sampling/test_mesh.py);
- logged metrics: RTOL = 2e-6 relative plus ATOL_METRIC = 1e-6 absolute for the ones that are 0
  up to rounding at the first update (kl, approx_kl, ratio - 1: differences of two log-probs of
  magnitude ~6.5, whose rounding is ~1e-6); the clip fractions are counts and match exactly at
  ratio 1;
- params after the step(s): the AdamW step lr * m / (sqrt(v) + eps) with the default eps = 1e-8
  is ~lr * sign(g) and flips for gradients within rounding of 0 (see
  tests/train/test_mesh_equivalence.py); optimizer.eps = 1e-3 makes the step smooth in g (its
  error is at most lr * |dg| / eps). Each weight may differ by RTOL of itself (a few float32
  ulps of the stored weight) plus STEP_TOL = 1e-4 of the largest change the one-device step
  made to its tensor (a tensor that starts at 0, like PPO's value head, has only its steps).
  Measured: at most one ulp of the weight, and 2.7e-6 of the largest step (the value head after
  PPO's 4 updates), so a missing, doubled or mis-sharded update fails by orders of magnitude.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.config import apply_overrides, load_config
from jaxalign.train import init_params, setup
from jaxalign.train import online as online_loop
from jaxalign.train.updates import initial_rl_state

ROOT = pathlib.Path(__file__).resolve().parents[2]
RTOL = 2e-6
ATOL_METRIC = 1e-6
ATOL_LOGP = 1e-5
STEP_TOL = 1e-4

MESHES = {
    "fsdp8": ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
    "fsdp4-tensor2": ({"data": 1, "fsdp": 4, "tensor": 2}, "fsdp_tp"),
}
ONE_DEVICE = ({"fsdp": -1}, "fsdp")
FAMILIES = {  # the KL terms and PPO's shuffled minibatches on, whatever the configs' defaults
    "grpo": ("rl.kl_coef=0.04",),
    "ppo": (
        "rl.kl_coef=0.02",
        "rl.kl_target=0.5",
        "rl.reward_scale=True",
        "rl.epochs=2",
        "rl.minibatches=2",
    ),
}


def _config(family: str, mesh: dict, preset: str):
    config = load_config(f"{ROOT / 'configs' / family / 'tiny.py'}:smoke=True")
    overrides = [f"mesh.{axis}={size}" for axis, size in mesh.items()]
    overrides += [
        f"sharding={preset}",
        f"tokenizer={ROOT / 'data/demo/tokenizer.model'}",
        f"data.train={ROOT / 'data/demo/sft_train.jsonl'}",
        "data.eval=",
        "data.batch_size=4",
        "rl.group_size=4",
        "rl.max_new_tokens=6",
        "rl.temperature=0.9",
        "rl.rewards=(('length', 1.0, {'target': 12, 'scale': 12}),)",
        "optimizer.lr=1e-3",
        "optimizer.eps=1e-3",  # a smooth AdamW step (module docstring)
        *FAMILIES[family],
    ]
    return apply_overrides(config, overrides)


def _one_step(config, params, devices=None):
    """Step 0 of the online loop on the config's mesh: (rollout rows, update batch, metrics,
    params after the update)."""
    run = setup(config, devices=devices)
    placed = jax.device_put(params, run.param_shardings)
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), run.replicated),
        "params": placed,
        "opt_state": jax.jit(run.tx.init, out_shardings=run.state_shardings["opt_state"])(placed),
    }
    ref = jax.device_put(params, run.param_shardings)
    rl_state = jax.device_put(initial_rl_state(config), run.replicated)
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    options = online_loop.sampling_options(run)
    scorer = online_loop.Scorer(run)
    pipeline = run.batches(config.data.train, train=True)
    rows, per_fn, result, stats = online_loop.rollout_step(
        run, placed, pipeline, key, options, scorer, 0
    )
    batch, prepared, _ = run.family.to_batch(run)(state | {"rl": rl_state}, ref, rows)
    train_step, updates = run.jit_train_step(), []
    for minibatch in online_loop._minibatches(run, batch, key, online_loop._take(run)):
        state, metrics = train_step(state, ref, minibatch)
        updates.append(metrics)
    metrics = jax.tree.map(lambda *x: np.mean(np.stack(x)), *jax.device_get(updates))
    metrics |= jax.device_get(prepared) | stats
    metrics |= online_loop.rollout_metrics(rows, per_fn, result, config.rl.group_size)
    return run, rows, jax.device_get(batch), metrics, jax.device_get(state["params"]), len(updates)


@pytest.fixture(scope="module")
def initial_params():
    run = setup(_config("ppo", *ONE_DEVICE), devices=jax.devices()[:1])
    return jax.device_get(init_params(run))  # with PPO's value head; GRPO drops it


def _params_for(family, params):
    return params if family == "ppo" else {k: v for k, v in params.items() if k != "value_head"}


@pytest.fixture(scope="module")
def single_device(initial_params):
    out = {}
    for family in FAMILIES:
        config = _config(family, *ONE_DEVICE)
        params = _params_for(family, initial_params)
        out[family] = _one_step(config, params, devices=jax.devices()[:1])
        assert out[family][0].mesh.devices.size == 1
    return out


def test_the_reference_step_samples_scores_and_moves_every_weight(initial_params, single_device):
    """Guards the comparison: rewards that differ within groups, and an update that moved every
    trained weight (a step that changed nothing would match trivially)."""
    for family, (_, rows, _, metrics, params, updates) in single_device.items():
        rewards = rows["rewards"].reshape(-1, 4)
        assert (rewards.max(axis=1) > rewards.min(axis=1)).all(), family
        assert updates == (4 if family == "ppo" else 1)
        assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
        moved = jax.tree.map(
            lambda a, b: np.abs(a - b).max(), params, _params_for(family, initial_params)
        )
        assert all(m > 0 for m in jax.tree.leaves(moved)), family


@pytest.mark.parametrize(
    "name, family",
    [
        (name, family)
        if (name, family) == ("fsdp4-tensor2", "grpo")  # the others: slow
        else pytest.param(name, family, marks=pytest.mark.slow)
        for name in MESHES
        for family in FAMILIES
    ],
)
def test_online_step_matches_single_device(name, family, initial_params, single_device):
    mesh, preset = MESHES[name]
    _, want_rows, want_batch, want, want_params, _ = single_device[family]
    config = _config(family, mesh, preset)
    run, rows, batch, got, params, _ = _one_step(config, _params_for(family, initial_params))
    assert dict(run.mesh.shape) == mesh and run.mesh.devices.size == 8
    spec = run.param_shardings["layers"]["mlp"]["up_proj"]["kernel"].spec
    assert tuple(spec) == ((None, "fsdp", None) if preset == "fsdp" else (None, "fsdp", "tensor"))
    # The rollout: the same tokens and rewards, the same log-probs to float32 rounding.
    for key in ("tokens", "targets", "loss_mask", "positions", "rewards"):
        np.testing.assert_array_equal(rows[key], want_rows[key], err_msg=key)
    np.testing.assert_allclose(rows["sampler_logps"], want_rows["sampler_logps"], atol=ATOL_LOGP)
    for key in ("old_logps", "ref_logps", "old_values", "returns", "advantages"):
        if key in want_batch:
            np.testing.assert_allclose(batch[key], want_batch[key], atol=ATOL_LOGP, err_msg=key)
    # The update's metrics (and the rollout's), then the params it moved.
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if key.startswith("clip_ratio") or key.startswith("rewards") or key == "reward":
            assert got[key] == value, key
        else:
            np.testing.assert_allclose(
                got[key], value, rtol=RTOL, atol=ATOL_METRIC, err_msg=f"{family} {key}"
            )
    start = _params_for(family, initial_params)
    for (path, a), b, b0 in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree.leaves(want_params),
        jax.tree.leaves(start),
        strict=True,
    ):
        largest_step = np.abs(b - b0).max()
        np.testing.assert_allclose(
            a, b, rtol=RTOL, atol=STEP_TOL * largest_step, err_msg=jax.tree_util.keystr(path)
        )
