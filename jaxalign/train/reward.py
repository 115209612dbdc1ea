"""Reward models: Bradley-Terry training of a scalar head on the decoder, regression of a
k-output head on k ratings (multi-objective, `reward_multi`), and scoring.

The head (`jaxalign.models.heads`) lives in the params tree next to the decoder's weights,
`params["reward_head"] = {"kernel": [D, k], "bias": [k]}` (k = 1 for Bradley-Terry), and gives

    r(x, y) = h_t* . kernel + bias   [k],

h_t* the decoder's final hidden state at the last position of the sequence x + y, i.e. the position
whose input is the last response token and whose target is EOS (inputs are ids[:-1], so the EOS
itself is never an input): the score has read the whole prompt and response. It starts at zero,
so every reward is 0 and the loss log 2 at step 0.

Scoring responses with a trained reward model (the run's workdir):

    model_config, params = load_reward_model("runs/rm-tiny")
    batch = next(make_sft_pipeline("responses.jsonl", tok, batch_size=8, max_len=128,
                                   shuffle=False, num_epochs=1))   # {prompt, completion} records
    rewards = score(model_config, params, batch)   # [8]; example_mask marks the real ones

A multi-objective model scores [8, k]; `score(..., direction=v)` gives r_v = v . r, [8].
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from jaxalign import models
from jaxalign.data import layout
from jaxalign.data.layout import BatchSpec
from jaxalign.losses import reward as reward_losses
from jaxalign.models import heads
from jaxalign.train import objectives
from jaxalign.train.objectives import Objective

HEAD = heads.REWARD_HEAD


def sequence_rewards(model_config, params, batch, seqs_per_group: int, num_groups: int):
    """r(x, y) of every sequence of the batch: [B, k] float32 (0 for empty slots)."""
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
    # The last position of each sequence (its target is the last response token, EOS); padding
    # (index = total) falls outside the `total` segments and is dropped, with no slice of a
    # [total + 1] array, which the CPU partitioner splits unevenly over 8 devices into
    # collective-permutes that deadlocked (the k-output head's run).
    last = jax.ops.segment_max(jnp.where(index < total, flat, -1).ravel(), index.ravel(), total)
    h = hidden.reshape(R * T, D)[jnp.maximum(last, 0)]
    return jnp.where(last[:, None] >= 0, heads.apply_head(params[HEAD], h), 0.0)


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
        r = sequence_rewards(model_config, params, micro, per_group, num_groups)[:, 0]
        inputs = layout.data_fields(micro)
        inputs["chosen_rewards"], inputs["rejected_rewards"] = objectives.split_pairs(r, num_groups)
        per_pair, metrics = loss(inputs)
        weight = micro["example_mask"]
        return (per_pair * weight).sum(), weight.sum(), objectives.weighted(metrics, weight)

    return Objective(fn, BatchSpec("pair", fields=tuple(fields)))


def ratings_objective(
    model_config,
    loss,
    loss_kwargs: dict | None = None,
    *,
    num_ratings: int,
    num_groups: int = 1,
    fields=(),
) -> Objective:
    """Multi-objective reward model (Wang et al., 2024, DPA): the k-output head regressed on the
    k ratings of each `{prompt, response, ratings}` record,

    loss = (1/k) sum_j (r_j(x, y) - s_j)^2   (`losses.multi_objective_mse`, or any loss on
    `rewards` [B, k] and `ratings` [B, k]).

    Metrics: rewards/mse_<j> per objective, rewards/mae."""
    loss = objectives.as_loss(loss, loss_kwargs)

    def fn(params, ref_params, micro, loss_state=None):
        del ref_params, loss_state
        weight = micro["example_mask"]
        per_group = weight.shape[0] // num_groups
        inputs = layout.data_fields(micro)
        inputs["rewards"] = sequence_rewards(model_config, params, micro, per_group, num_groups)
        per_example, metrics = loss(inputs)
        return (per_example * weight).sum(), weight.sum(), objectives.weighted(metrics, weight)

    return Objective(fn, BatchSpec("ratings", fields=tuple(fields), num_ratings=num_ratings))


def score(
    model_config, params, batch, num_sequences: int | None = None, *, direction=None
) -> jax.Array:
    """Rewards of the B sequences of one host batch: [B] for a one-output head, [B, k] for a
    k-output head, or r_v = v . r [B] with `direction` v (a unit vector of k numbers,
    `losses.unit_direction`). B defaults to the SFT / unpaired layout's batch size (sequence i is
    example i); pass 2P for a pair batch (chosen, then rejected)."""
    B = num_sequences or batch["example_mask"].shape[0]
    arrays = {k: jnp.asarray(v) for k, v in batch.items() if k != "records"}
    r = _score(model_config, params, arrays, B, 1)
    if direction is not None:
        return reward_losses.directional_reward(r, jnp.asarray(direction))
    return r[:, 0] if r.shape[1] == 1 else r


_score = jax.jit(sequence_rewards, static_argnums=(0, 3, 4))


def load_reward_model(workdir: str | pathlib.Path):
    """(model_config, params with "reward_head") from the latest checkpoint of a reward run; the
    head has the run's `reward.num_objectives` outputs (1 for a Bradley-Terry run)."""
    from jaxalign.checkpoint.convert import load_model_params, read_model_config
    from jaxalign.train.workdir import read_config

    recorded = read_config(workdir) or {}
    outputs = recorded.get("reward", {}).get("num_objectives", 1)
    head = {HEAD: heads.abstract_head(read_model_config(workdir), outputs)}
    return load_model_params(workdir, heads=head)  # LoRA: adapters merged into the base
