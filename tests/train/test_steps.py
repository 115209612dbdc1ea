"""The pure steps: gradient accumulation gives the gradient of the whole batch (compared as
gradients, which Adam's update would hide: it divides out any common scale), and the compiled
step traces the model once whatever the number of micro-batches."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import models
from jaxalign.config import apply_overrides, load_config
from jaxalign.data import load_tokenizer, make_sft_pipeline
from jaxalign.train import setup, steps
from jaxalign.train.plan import abstract_batch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _sft_config(*overrides):
    config = load_config(f"{ROOT / 'configs/sft/tiny.py'}:smoke=True")
    return apply_overrides(
        config, [f"tokenizer={ROOT / 'data/demo/tokenizer.model'}", "data.pack=False", *overrides]
    )


def _batch():
    tok = load_tokenizer(str(ROOT / "data/demo/tokenizer.model"))
    path = str(ROOT / "data/demo/sft_train.jsonl")
    return next(make_sft_pipeline(path, tok, batch_size=16, max_len=32, max_prompt_len=24, seed=3))


def _halves(batch):
    """Pad mode: row r is sequence r, so the batch splits by rows into two micro-batches."""
    out = []
    for part in (slice(0, 8), slice(8, 16)):
        micro = {k: v[part] for k, v in batch.items()}
        micro["seq_index"] = np.where(micro["seq_index"] >= 0, micro["seq_index"] - part.start, -1)
        out.append(micro)
    return out


def _token_mean_nll(model_config, params, batch):
    """The SFT loss written out directly: full logits, log_softmax, gather, token mean."""
    hidden = models.forward(
        model_config, params, batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    logits = hidden @ models.unembedding(model_config, params)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    return -(logp * mask).sum() / mask.sum()


# Slow: test_one_and_two_micro_batches_take_the_same_step is its fast sibling (the same property
# through the train step).
@pytest.mark.slow
def test_accumulated_gradient_is_the_gradient_of_the_whole_batch():
    run = setup(_sft_config(), devices=jax.devices()[:1])
    batch = _batch()
    params = models.init_params(run.model_config, jax.random.key(0))

    def grads(micro_batches):
        stacked = {k: jnp.stack([m[k] for m in micro_batches]) for k in micro_batches[0]}
        fn = jax.jit(
            lambda p, b: steps.accumulate(
                run.objective, p, None, b, with_grad=True, loss_state=None
            )
        )
        loss, _, g, _ = fn(params, stacked)
        return loss, g

    want_loss, want = jax.value_and_grad(_token_mean_nll, argnums=1)(
        run.model_config, params, batch
    )
    for micro_batches in ([batch], _halves(batch)):
        loss, got = grads(micro_batches)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_one_and_two_micro_batches_take_the_same_step():
    run = setup(_sft_config(), devices=jax.devices()[:1])
    batch = _batch()
    params = models.init_params(run.model_config, jax.random.key(0))
    state = {"step": np.int32(0), "params": params, "opt_state": run.tx.init(params)}
    step = jax.jit(steps.make_train_step(run.objective, run.tx, run.schedule))
    one, m1 = step(state, None, run.global_batch([batch]))
    two, m2 = step(state, None, run.global_batch(_halves(batch)))
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        one["params"],
        two["params"],
    )


def _dot_generals(config) -> int:
    run = setup(config, devices=jax.devices()[:1], read_files=False)
    ref = run.abstract_target()["params"] if run.needs_ref else None
    lowered = run.jit_train_step().lower(run.abstract_target(), ref, abstract_batch(run))
    return lowered.as_text().count("dot_general")


def test_grad_accum_traces_the_model_once():
    dpo = load_config(f"{ROOT / 'configs/dpo/tiny.py'}:smoke=True")
    one = _dot_generals(apply_overrides(dpo, ["data.batch_size=16", "optimizer.grad_accum=1"]))
    four = _dot_generals(apply_overrides(dpo, ["data.batch_size=16", "optimizer.grad_accum=4"]))
    assert one > 0 and four == one
