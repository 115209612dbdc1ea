"""Reference schedules (`config.reference`): TR-DPO's soft / hard updates against the formula in
float64 NumPy, in a run on the 8-device fsdp mesh and across a resume; the SALSA soup reference
against the average of its models; one-line errors for schedules a run cannot have."""

import pathlib
import shutil

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from jaxalign import models
from jaxalign.checkpoint import manager as ckpt
from jaxalign.checkpoint import save_hf
from jaxalign.config import apply_overrides, load_config, to_dict
from jaxalign.errors import ConfigError
from jaxalign.train import evaluate_checkpoint, reference, setup, train
from jaxalign.train.cache_ref import cache_reference
from jaxalign.train.run import frozen_params

ROOT = pathlib.Path(__file__).resolve().parents[2]
DPO = str(ROOT / "configs/dpo/tiny.py")
ALPHA, EVERY, STEPS = 0.6, 2, 5


def _config(*overrides):
    return apply_overrides(load_config(f"{DPO}:smoke=True"), list(overrides))


def _tr_dpo(*extra):
    return _config(
        "reference.update=soft",
        f"reference.alpha={ALPHA}",
        f"reference.every={EVERY}",
        f"steps={STEPS}",
        "checkpoint.every=1",
        "checkpoint.keep=10",
        "log_every=1",
        "data.eval=",
        *extra,
    )


def _numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float64), tree)


def _state(config, workdir, step):
    """The checkpointed state (params, ref, ...) of `workdir` at `step`, as float64 NumPy."""
    manager, _ = ckpt.open_latest(workdir)
    try:
        state, _ = ckpt.restore(manager, setup(config).abstract_target(), step)
    finally:
        manager.close()
    return state


def test_update_is_the_formula_in_float64():
    shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    rng = np.random.default_rng(0)
    ref = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=5)}
    ref["b"] = ref["b"].astype(np.float32)
    policy = jax.tree.map(lambda x: (x + rng.normal(size=x.shape)).astype(np.float32), ref)
    for rule, alpha in (("soft", 0.6), ("hard", 1.0)):
        config = ConfigDict({"reference": {"update": rule, "alpha": 0.6, "every": 1}})
        update = reference.make_update(config, shardings)
        got = update(jax.tree.map(np.copy, ref), policy)
        want = jax.tree.map(lambda r, p, a=alpha: a * p + (1 - a) * r, _numpy(ref), _numpy(policy))
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=0, atol=1e-6), got, want)
        assert all(g.dtype == np.float32 for g in jax.tree.leaves(got))
    hard = reference.make_update(
        ConfigDict({"reference": {"update": "hard", "alpha": 0.6, "every": 1}}), shardings
    )
    jax.tree.map(np.testing.assert_array_equal, hard(jax.tree.map(np.copy, ref), policy), policy)
    assert reference.make_update(ConfigDict({"reference": {"update": ""}}), shardings) is None


@pytest.fixture(scope="module")
def tr_dpo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tr-dpo")
    config = _tr_dpo()
    return config, workdir, train(config, workdir)


def test_tr_dpo_reference_follows_the_formula_on_the_mesh(tr_dpo_run):
    config, workdir, _ = tr_dpo_run
    run = setup(config)
    assert run.mesh.size == 8 and run.mesh.shape["fsdp"] == 8
    initial = _numpy(models.init_params(run.model_config, jax.random.key(config.seed)))
    states = {s: _state(config, workdir, s) for s in range(1, STEPS + 1)}
    expected = initial
    for step in range(1, STEPS + 1):
        if step % EVERY == 0:  # after this step's update: alpha * policy + (1 - alpha) * ref
            policy = _numpy(states[step]["params"])
            expected = jax.tree.map(lambda p, r: ALPHA * p + (1 - ALPHA) * r, policy, expected)
        got = states[step]["ref"]
        jax.tree.map(
            lambda g, w: np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=2e-6),
            got,
            expected,
        )
        # The reference is sharded like the policy (fsdp over the 8 devices).
        jax.tree.map(
            lambda r, p: (
                r.sharding.is_equivalent_to(p.sharding, r.ndim) or pytest.fail("ref sharding")
            ),
            got,
            states[step]["params"],
        )
    final = states[STEPS]["ref"]
    moved = jax.tree.map(lambda g, w: np.abs(np.asarray(g) - w).max(), final, initial)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the reference did follow the policy


def test_tr_dpo_resume_is_bit_identical(tr_dpo_run, tmp_path):
    config, straight, summary = tr_dpo_run
    # Interrupted after step 3: the reference was updated at step 2 and the resumed run must
    # continue from it (not from the initial policy) for the update at step 4 and the losses.
    workdir = tmp_path / "resumed"
    shutil.copytree(straight, workdir)
    for step in range(4, STEPS + 1):
        shutil.rmtree(workdir / "checkpoints" / str(step))
    (workdir / "summary.json").unlink()
    resumed = train(config, workdir)
    assert resumed["steps"] == [3, STEPS]
    a, b = _state(config, straight, STEPS), _state(config, workdir, STEPS)
    for key in ("params", "ref", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(b[key]), jax.device_get(a[key]))
    assert resumed["train"]["loss"] == summary["train"]["loss"]
    # `jaxalign eval` of the run takes the checkpointed reference (the eval step's inputs).
    with config.unlocked():
        config.data.eval = str(ROOT / "data/demo/pairs_eval.jsonl")
    assert np.isfinite(evaluate_checkpoint(config, workdir)["loss"])


@pytest.fixture(scope="module")
def soup_models(tmp_path_factory):
    """Two tiny-64 Hugging Face directories (random inits of seeds 1 and 2) and their params."""
    where = tmp_path_factory.mktemp("soup")
    model_config = models.get_preset("tiny-64")
    out = []
    for seed in (1, 2):
        params = models.init_params(model_config, jax.random.key(seed))
        save_hf(model_config, params, where / f"m{seed}")
        out.append((f"hf:{where / f'm{seed}'}", params))
    return out


def test_soup_reference_is_the_average_and_is_used(soup_models, tmp_path):
    specs = tuple(spec for spec, _ in soup_models)
    config = _config(f"reference.soup={specs!r}", "data.eval=", "steps=1")
    run = setup(config)
    got = _numpy(frozen_params(run))
    a, b = (_numpy(p) for _, p in soup_models)
    jax.tree.map(
        lambda g, x, y: np.testing.assert_allclose(g, (x + y) / 2, rtol=0, atol=1e-7), got, a, b
    )
    # The run's reference is the soup: at the first step the implicit rewards are not all zero
    # (they are exactly zero when the reference is the initial policy).
    summary = train(config, tmp_path / "run")
    assert summary["train"]["rewards/margin"] != 0.0


def test_soup_cache_ref_is_keyed_by_the_soup(soup_models, tmp_path):
    specs = tuple(spec for spec, _ in soup_models)
    config = _config(f"reference.soup={specs!r}")
    cache_reference(config, str(tmp_path / "ref.jsonl"))
    plain = ConfigDict(to_dict(config))
    plain.reference.soup = ()
    plain.data.ref_logps = str(tmp_path / "ref.jsonl")
    # A run whose reference is the initial policy refuses the soup's cache.
    with pytest.raises(Exception, match="reference"):
        next(iter(setup(plain).batches(plain.data.train, train=True)))


def test_soup_of_another_architecture_names_the_tensor(tmp_path):
    other = models.get_preset("tiny-64").replace(vocab_size=96)
    save_hf(other, models.init_params(other, jax.random.key(0)), tmp_path / "other")
    config = _config(f"reference.soup=('hf:{tmp_path / 'other'}',)")
    with pytest.raises(ConfigError, match=r"reference.soup: .*other.*: tensor .*embed.* shape"):
        frozen_params(setup(config))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["reference.update=sofft"], 'reference.update="sofft": expected'),
        (["reference.update=soft", "reference.alpha=0.0"], "reference.alpha=0.0: expected"),
        (["reference.update=hard", "reference.every=0"], "reference.every=0: expected"),
        (["reference.soup=('runs/a',)"], 'reference.soup: "runs/a": expected'),
        (["reference.update=soft", "lora.rank=4"], "a LoRA run's reference is its base"),
        (["reference.update=soft", "data.ref_logps=x.jsonl"], "cannot be cached"),
    ],
)
def test_bad_schedules_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        setup(_config(*overrides))


def test_schedules_refused_where_no_reference_is_held():
    config = _config("reference.update=soft")
    with config.unlocked():
        config.loss = {"name": "simpo", "beta": 2.0}
    with pytest.raises(ConfigError, match='the loss "simpo" uses no reference policy'):
        setup(config)
    grpo = apply_overrides(
        load_config(f"{ROOT / 'configs/grpo/tiny.py'}:smoke=True"), ["reference.update=soft"]
    )
    with pytest.raises(ConfigError, match='offline families .* not "grpo"'):
        setup(grpo)
    with pytest.raises(ConfigError, match="cannot be cached"):
        cache_reference(_config("reference.update=hard"), "/nonexistent/ref.jsonl")
