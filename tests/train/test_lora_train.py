"""Training with LoRA (`lora.rank` > 0): only the adapters train and are saved, the frozen base is
the reference, the families run, a sharded step equals the single-device one, and the
compile-only plan holds the base once."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxalign import models
from jaxalign.checkpoint import convert
from jaxalign.checkpoint import manager as ckpt
from jaxalign.config import apply_overrides, load_config
from jaxalign.data import load_tokenizer, make_pair_pipeline
from jaxalign.errors import ConfigError
from jaxalign.train import setup, train
from jaxalign.train.plan import compile_plan
from jaxalign.train.run import base_params, init_params

ROOT = pathlib.Path(__file__).resolve().parents[2]
LORA = ["lora.rank=4", "lora.alpha=8.0", "lora.targets=proj"]


def _config(name, *overrides, arg="smoke=True"):
    config = load_config(f"{ROOT / 'configs' / name}.py:{arg}")
    return apply_overrides(
        config, [f"tokenizer={ROOT / 'data/demo/tokenizer.model'}", *LORA, *overrides]
    )


def _saved_params(workdir) -> dict:
    manager, step = ckpt.open_latest(workdir)
    manager.close()
    item = ckpt.checkpoint_dir(workdir) / str(step) / "state"
    return ocp.PyTreeCheckpointHandler().metadata(item).tree["params"]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora") / "dpo"
    config = _config(
        "dpo/tiny", "lora.dropout=0.1", f"data.train={ROOT}/data/demo/pairs_train.jsonl"
    )
    return config, workdir, train(config, workdir)


def test_dpo_trains_only_adapters_and_saves_only_them(dpo_run):
    config, workdir, summary = dpo_run
    assert np.isfinite(summary["train"]["loss"])
    saved = _saved_params(workdir)
    assert set(saved) == {"lora"}  # no base weights, no reference in the checkpoint
    run = setup(config)
    n_adapters = models.adapter_count(run.model_config)
    n_saved = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(saved))
    assert n_saved == n_adapters < models.param_count(run.model_config) / 10
    # The merged model differs from the base: the adapters moved.
    _, merged = convert.load_model_params(workdir)
    base = base_params(run)
    moved = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), merged, base
    )
    assert moved["layers"]["attn"]["q_proj"]["kernel"] > 0
    assert moved["embed"]["embedding"] == 0.0  # not a target: untouched


def test_step_gradient_reaches_only_adapters_and_reference_is_the_base(dpo_run):
    """One real step: the base argument is not touched, B moves, A does not (dL/dA = 0 while B is
    0), and at step 0 the policy equals the reference (implicit rewards 0)."""
    config, _, _ = dpo_run
    config = apply_overrides(config, ["optimizer.warmup_steps=0"])
    run = setup(config, devices=jax.devices()[:1])
    base = base_params(run)
    before = jax.device_get(base)
    adapters = init_params(run)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": adapters,
        "opt_state": jax.jit(run.tx.init)(adapters),
    }
    initial = jax.device_get(adapters)
    batch = run.global_batch([next(run.batches(config.data.train, train=True))])
    new, metrics = run.jit_train_step()(state, base, batch)
    # B = 0: policy = reference up to XLA fusing the two programs' matmuls differently.
    assert abs(float(metrics["rewards/chosen"])) < 1e-6
    assert abs(float(metrics["rewards/rejected"])) < 1e-6
    assert float(metrics["grad_norm"]) > 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(base), before)
    for module in ("q_proj", "o_proj"):
        got, was = (
            new["params"]["lora"]["layers"]["attn"][module],
            initial["lora"]["layers"]["attn"][module],
        )
        np.testing.assert_array_equal(got["lora_a"], was["lora_a"])
        assert np.abs(np.asarray(got["lora_b"])).max() > 0


def _one_step(config, batch, devices=None):
    run = setup(config, devices=devices)
    base = jax.device_put(
        models.init_params(run.model_config, jax.random.key(0)), run.base_shardings
    )
    adapters = jax.device_put(
        models.attach({}, _nonzero_adapters(run.model_config)), run.param_shardings
    )
    opt_init = jax.jit(run.tx.init, out_shardings=run.state_shardings["opt_state"])
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), run.replicated),
        "params": adapters,
        "opt_state": opt_init(adapters),
    }
    new, metrics = run.jit_train_step()(state, base, run.global_batch([batch]))
    return run, jax.device_get(new), jax.device_get(metrics)


def _nonzero_adapters(model_config):
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype),
        models.abstract_adapters(model_config),
    )


def test_fsdp8_step_equals_one_device():
    """Loss, gradient norm and updated adapters under fsdp=8 equal one device's (float32 rounding:
    the tolerances of test_mesh_equivalence)."""
    config = _config(
        "dpo/tiny",
        "optimizer.warmup_steps=0",
        "data.batch_size=16",
        "mesh.fsdp=-1",
        "sharding=fsdp",
    )
    batch = next(
        make_pair_pipeline(
            str(ROOT / "data/demo/pairs_train.jsonl"),
            load_tokenizer(config.tokenizer),
            batch_size=16,
            max_len=config.data.max_len,
            max_prompt_len=config.data.max_prompt_len,
            seed=0,
        )
    )
    _, want_state, want = _one_step(config, batch, devices=jax.devices()[:1])
    run, got_state, got = _one_step(config, batch)
    assert run.mesh.shape["fsdp"] == 8
    spec = run.param_shardings["lora"]["layers"]["mlp"]["up_proj"]["lora_a"].spec
    assert tuple(spec) == (None, "fsdp", None)  # the adapters really are sharded
    assert float(want["rewards/margin"]) != 0.0  # nonzero adapters: policy != reference
    for key in ("loss", "grad_norm", "rewards/margin"):
        np.testing.assert_allclose(got[key], want[key], rtol=2e-5, err_msg=key)
    lr = float(want["learning_rate"])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=0.05 * lr, rtol=0),
        got_state["params"],
        want_state["params"],
    )


@pytest.mark.parametrize(
    "name, overrides",
    [
        pytest.param("sft/tiny", (), marks=pytest.mark.slow),  # fast: the DPO run above
        ("kto/tiny", ()),
        # online with LoRA (the sampler runs the adapted params): slow, ~25 s
        pytest.param("grpo/tiny", ("lora.dropout=0.1",), marks=pytest.mark.slow),
        pytest.param("ppo/tiny", (), marks=pytest.mark.slow),  # fast: grpo (online, sampler)
    ],
)
def test_families_train_with_lora(name, overrides, tmp_path):
    """Offline and online families (the sampler runs the adapted params; PPO's value head trains
    next to the adapters)."""
    summary = train(_config(name, *overrides), tmp_path / "run")
    assert np.isfinite(summary["train"]["loss"])
    saved = _saved_params(tmp_path / "run")
    assert "lora" in saved and "layers" not in saved and "embed" not in saved


def test_bad_lora_config_is_a_config_error():
    with pytest.raises(ConfigError, match="lora: LoraConfig.targets='nothing' matches none"):
        setup(_config("dpo/tiny", "lora.targets=nothing"), devices=jax.devices()[:1])


def _bytes_per_device(abstract, shardings) -> int:
    return sum(
        int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
        for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
    )


@pytest.mark.slow  # a compile-only plan of both runs, ~25 s
def test_plan_holds_the_base_once():
    """Compile-only DPO on this machine's 8 devices: full fine-tuning's arguments hold the policy,
    its two Adam moments and the reference; LoRA's the base once plus the adapters and their two
    moments. The difference is 3 (base - adapters) per device, as XLA reports it."""
    # Scanned layers, as on an accelerator (on CPU "auto" unrolls them, and the unrolled LoRA
    # program's temporaries outgrow the saving at this tiny size).
    overrides = [
        "model.preset=tiny-gemma3",
        "data.batch_size=8",
        "mesh.fsdp=-1",
        "model.layer_loop=scan",
    ]
    full = compile_plan(_config("dpo/tiny", *overrides, "lora.rank=0"), echo=False)
    lora_config = _config("dpo/tiny", *overrides)
    lora = compile_plan(lora_config, echo=False)
    assert lora["lora"] and not full["lora"]
    assert lora["trained_params"] < full["trained_params"] / 5
    run = setup(lora_config, read_files=False)
    base = _bytes_per_device(models.abstract_params(run.model_config), run.base_shardings)
    adapters = _bytes_per_device(run.abstract_state["params"], run.param_shardings)
    saved = full["memory"]["arguments"] - lora["memory"]["arguments"]
    assert saved == 3 * (base - adapters), (saved, base, adapters)
    assert lora["memory"]["total"] < full["memory"]["total"]
