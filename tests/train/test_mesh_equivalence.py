"""One DPO train step gives the same numbers on every mesh as on one device.

The real path: `setup(config)` with `config.mesh` / `config.sharding` overridden, the jitted step
(`run.jit_train_step()`, explicit shardings, donated state) and `run.global_batch`. The batch is a
fixed batch of the demo pairs; the reference is the initial params; the optimizer takes a real
step (no warmup, so the learning rate is not 0 at step 0).

Sharding changes only the order of floating-point reductions (per-shard partial sums, then an
all-reduce), so the results agree to float32 rounding, never exactly by construction:

- loss, gradient norm and the logged metrics: RTOL = 2e-6 relative (measured: identical to the
  bit on this batch for all three meshes);
- gradients, elementwise, read from Adam's first moment (mu = (1 - b1) * g after one step, g after
  global-norm clipping). A weight gradient is a sum over the B * T = 1536 tokens of the batch, so
  its rounding error scales with sqrt(1536) * 2^-24 ~ 2.4e-6 of the magnitude of the summed terms,
  not of the (possibly cancelled) result: atol = GRAD_TOL times the largest element of the
  tensor. Measured: 2.2e-6 (data=8), 2.2e-6 (fsdp=8), 2.7e-6 (fsdp=4 x tensor=2); the same single
  device with the batch rows permuted (same math, different summation order) gives 1.9e-6;
- updated params, elementwise: AdamW's first step is lr * g / (|g| + eps) (eps = 1e-8), whose
  sensitivity to g is eps / (|g| + eps)^2. Where the gradient tolerance delta reaches |g| (about
  1e-9 here: weights the batch barely touches) even the sign of the step is rounding noise, and the
  measured differences there reach 1.2% of lr. So each element may differ by the step error that
  the gradient tolerance implies, lr * min(2, delta * eps / (max(|g| - delta, 0) + eps)^2), plus
  RTOL of the tensor's largest weight; everywhere else that is ~RTOL, so a wrong learning rate,
  sign or shard would fail by orders of magnitude.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign import models
from jaxalign.config import apply_overrides, load_config
from jaxalign.data import load_tokenizer, make_pair_pipeline
from jaxalign.train import setup

ROOT = pathlib.Path(__file__).resolve().parents[2]
RTOL = 2e-6  # scalars and params: float32 reduction order (see the module docstring)
GRAD_TOL = 1e-5  # gradients, relative to each tensor's largest element (module docstring)

MESHES = {
    "data8-dp": ({"data": 8, "fsdp": 1, "tensor": 1}, "dp"),
    "fsdp8-fsdp": ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
    "fsdp4-tensor2-fsdp_tp": ({"data": 1, "fsdp": 4, "tensor": 2}, "fsdp_tp"),
}


def _config(mesh: dict, preset: str):
    config = load_config(f"{ROOT / 'configs/dpo/tiny.py'}:smoke=True")
    overrides = [f"mesh.{axis}={size}" for axis, size in mesh.items()]
    overrides += [
        f"sharding={preset}",
        f"tokenizer={ROOT / 'data/demo/tokenizer.model'}",
        "optimizer.warmup_steps=0",
        "data.batch_size=16",  # 32 sequences x 48 tokens = the 1536 tokens of the docstring
        "model.preset=tiny-64",
    ]
    return apply_overrides(config, overrides)


@pytest.fixture(scope="module")
def inputs():
    config = _config({"fsdp": -1}, "fsdp")
    batch = next(
        make_pair_pipeline(
            str(ROOT / "data/demo/pairs_train.jsonl"),
            load_tokenizer(config.tokenizer),
            batch_size=config.data.batch_size,
            max_len=config.data.max_len,
            max_prompt_len=config.data.max_prompt_len,
            seed=0,
        )
    )
    params = jax.device_get(models.init_params(models.get_preset("tiny-64"), jax.random.key(0)))
    return batch, params


def _one_step(config, batch, params, devices=None):
    run = setup(config, devices=devices)
    assert run.needs_ref
    policy = jax.device_put(params, run.param_shardings)
    reference = jax.device_put(params, run.param_shardings)
    opt_init = jax.jit(run.tx.init, out_shardings=run.state_shardings["opt_state"])
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), run.replicated),
        "params": policy,
        "opt_state": opt_init(policy),
    }
    new_state, metrics = run.jit_train_step()(state, reference, run.global_batch([batch]))
    return run, jax.device_get(new_state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def single_device(inputs):
    batch, params = inputs
    run, new_state, metrics = _one_step(
        _config({"fsdp": -1}, "fsdp"), batch, params, devices=jax.devices()[:1]
    )
    assert run.mesh.devices.size == 1
    return new_state, metrics


def test_the_reference_step_moves_every_trained_weight(inputs, single_device):
    """Guards the comparison: a step that changed nothing would match trivially."""
    _, params = inputs
    new_state, metrics = single_device
    new_params = new_state["params"]
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert metrics["learning_rate"] > 0
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), new_params, params)
    assert all(m > 0 for m in jax.tree.leaves(moved))


@pytest.mark.parametrize("name", list(MESHES))
def test_train_step_matches_single_device(name, inputs, single_device):
    mesh, preset = MESHES[name]
    batch, params = inputs
    expected_state, expected = single_device
    run, got_state, got = _one_step(_config(mesh, preset), batch, params)
    assert dict(run.mesh.shape) == mesh and run.mesh.devices.size == 8
    # The params really are sharded as the preset says (not silently replicated).
    spec = run.param_shardings["layers"]["mlp"]["up_proj"]["kernel"].spec
    assert tuple(spec) == {"dp": (None, None, None), "fsdp": (None, "fsdp", None)}.get(
        preset, (None, "fsdp", "tensor")
    )
    for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(got[key], expected[key], rtol=RTOL, err_msg=key)
    # The margin beta * ((pc - rc) - (pr - rr)) is 0 up to rounding at step 0 (the reference is
    # the policy): its error is relative to the four log-probs it cancels, not to itself.
    beta = run.config.loss.beta
    scale = 2 * beta * (abs(expected["logps/chosen"]) + abs(expected["logps/rejected"]))
    np.testing.assert_allclose(
        got["rewards/margin"], expected["rewards/margin"], atol=RTOL * scale, rtol=0
    )
    # Gradients, elementwise, and the params they moved (see the module docstring).
    lr, eps = float(expected["learning_rate"]), run.config.optimizer.eps
    b1 = run.config.optimizer.b1
    grads = jax.tree.map(lambda mu: mu / (1 - b1), _adam(expected_state).mu)
    got_grads = jax.tree.map(lambda mu: mu / (1 - b1), _adam(got_state).mu)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    for (path, g), have, p_want, p_have in zip(
        flat,
        jax.tree.leaves(got_grads),
        jax.tree.leaves(expected_state["params"]),
        jax.tree.leaves(got_state["params"]),
        strict=True,
    ):
        where = jax.tree_util.keystr(path)
        delta = GRAD_TOL * np.abs(g).max() + RTOL * np.abs(g)
        np.testing.assert_array_less(np.abs(have - g), delta + 1e-30, err_msg=f"grad {where}")
        step_error = lr * np.minimum(2, delta * eps / (np.maximum(np.abs(g) - delta, 0) + eps) ** 2)
        allowed = step_error + RTOL * np.abs(p_want).max()
        np.testing.assert_array_less(np.abs(p_have - p_want), allowed, err_msg=f"param {where}")


def _adam(state) -> optax.ScaleByAdamState:
    """The Adam moments inside the optimizer chain's state."""
    found = [
        s
        for s in jax.tree.leaves(
            state["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
        )
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(found) == 1
    return found[0]
