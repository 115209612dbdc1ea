"""Reward models: Bradley-Terry training of a scalar head on the decoder, and scoring.

The head (`jaxalign.models.heads`) lives in the params tree next to the decoder's weights,
`params["reward_head"] = {"kernel": [D, 1], "bias": [1]}`, and gives

    r(x, y) = h_t* . kernel[:, 0] + bias[0],

h_t* the decoder's final hidden state at the last position of the sequence x + y, i.e. the position
whose input is the last response token and whose target is EOS (inputs are ids[:-1], so the EOS
itself is never an input): the score has read the whole prompt and response. It starts at zero,
so every reward is 0 and the loss log 2 at step 0.

Scoring responses with a trained reward model (the run's workdir):

    model_config, params = load_reward_model("runs/rm-tiny")
    batch = next(make_sft_pipeline("responses.jsonl", tok, batch_size=8, max_len=128,
                                   shuffle=False, num_epochs=1))   # {prompt, completion} records
    rewards = score(model_config, params, batch)   # [8]; example_mask marks the real ones
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from jaxalign import models
from jaxalign.data import layout
from jaxalign.data.layout import BatchSpec
from jaxalign.models import heads
from jaxalign.train import objectives
from jaxalign.train.objectives import Objective

HEAD = heads.REWARD_HEAD


def sequence_rewards(model_config, params, batch, seqs_per_group: int, num_groups: int):
    """r(x, y) of every sequence of the batch: [B] float32 (0 for empty slots)."""
    hidden = models.forward(
        model_config,
        heads.decoder_params(params),
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
    )
    index, total = objectives.sequence_index(batch, seqs_per_group, num_groups)
    R, T, D = hidden.shape
    flat = jnp.arange(R * T).reshape(R, T)
    # The last position of each sequence (its target is the last response token, EOS).
    last = jax.ops.segment_max(
        jnp.where(index < total, flat, -1).ravel(), index.ravel(), total + 1
    )[:total]
    h = hidden.reshape(R * T, D)[jnp.maximum(last, 0)]
    return jnp.where(last >= 0, heads.apply_scalar_head(params[HEAD], h), 0.0)


def reward_objective(
    model_config, loss, loss_kwargs: dict | None = None, *, num_groups: int = 1, fields=()
) -> Objective:
    """Bradley-Terry (or any loss on `chosen_rewards` / `rejected_rewards`) on pair batches:

    loss = -logsig(r_w - r_l - margin) + center_coef (r_w + r_l)^2   (`losses.bradley_terry`),

    `margin` a per-pair data field when the batch carries one. Metrics: rewards/accuracy
    (r_w > r_l), rewards/margin, rewards/chosen, rewards/rejected."""
    loss = objectives.as_loss(loss, loss_kwargs)

    def fn(params, ref_params, micro, loss_state=None):
        del ref_params, loss_state
        per_group = 2 * micro["example_mask"].shape[0] // num_groups
        r = sequence_rewards(model_config, params, micro, per_group, num_groups)
        inputs = layout.data_fields(micro)
        inputs["chosen_rewards"], inputs["rejected_rewards"] = objectives.split_pairs(r, num_groups)
        per_pair, metrics = loss(inputs)
        weight = micro["example_mask"]
        return (per_pair * weight).sum(), weight.sum(), objectives.weighted(metrics, weight)

    return Objective(fn, BatchSpec("pair", fields=tuple(fields)))


def score(model_config, params, batch, num_sequences: int | None = None) -> jax.Array:
    """Rewards [B] of the B sequences of one host batch; B defaults to the SFT / unpaired layout's
    batch size (sequence i is example i); pass 2P for a pair batch (chosen, then rejected)."""
    B = num_sequences or batch["example_mask"].shape[0]
    arrays = {k: jnp.asarray(v) for k, v in batch.items() if k != "records"}
    return _score(model_config, params, arrays, B, 1)


_score = jax.jit(sequence_rewards, static_argnums=(0, 3, 4))


def load_reward_model(workdir: str | pathlib.Path):
    """(model_config, params with "reward_head") from the latest checkpoint of a reward run."""
    from jaxalign.checkpoint import manager as ckpt
    from jaxalign.checkpoint.convert import read_model_config

    model_config = read_model_config(workdir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = models.abstract_params(model_config)
    abstract[HEAD] = heads.abstract_scalar_head(model_config)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
    )
    return model_config, ckpt.load_params(workdir, abstract)
