"""Reward models: a scalar head on the decoder, Bradley-Terry training, scoring.

The head lives in the params tree next to the decoder's weights, so optimizer, sharding and
checkpoints treat it like any other parameter:

    params["reward_head"] = {"kernel": [D, 1], "bias": [1]}
    r(x, y) = h_t* . kernel[:, 0] + bias[0],

h_t* the decoder's final hidden state at the last position of the sequence x + y, i.e. the position
whose input is the last response token and whose target is EOS (inputs are ids[:-1], so the EOS
itself is never an input): the score has read the whole prompt and response. The model module is
untouched: the head is applied to `models.forward`'s hidden states. It starts at zero, so every
reward is 0 and the loss log 2 at step 0.

Scoring responses with a trained reward model (the run's workdir):

    model_config, params = load_reward_model("runs/rm-tiny")
    batch = next(make_sft_pipeline("responses.jsonl", tok, batch_size=8, max_len=128,
                                   shuffle=False, num_epochs=1))   # {prompt, completion} records
    rewards = score(model_config, params, batch)   # [8]; example_mask marks the real ones
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxalign import models
from jaxalign.train import steps

HEAD = "reward_head"


def init_head(model_config, dtype=None) -> dict:
    """Zero head {"kernel": [D, 1], "bias": [1]} (rewards start at 0)."""
    dtype = dtype or model_config.param_dtype
    return {
        "kernel": jnp.zeros((model_config.d_model, 1), dtype),
        "bias": jnp.zeros((1,), dtype),
    }


def abstract_head(model_config) -> dict:
    return jax.eval_shape(lambda: init_head(model_config))


def head_logical_axes() -> dict:
    return {"kernel": ("embed", None), "bias": (None,)}


def with_head(tree: dict, head) -> dict:
    """The decoder params tree (or a same-structured tree) with the head added."""
    return {**tree, HEAD: head}


def decoder_params(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != HEAD}


def sequence_rewards(model_config, params, batch, seqs_per_group: int, num_groups: int):
    """r(x, y) of every sequence of the batch: [S] float32 (0 for empty slots)."""
    hidden = models.forward(
        model_config,
        decoder_params(params),
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
    )
    index, total = steps.sequence_index(batch, seqs_per_group, num_groups)
    R, T, D = hidden.shape
    flat = jnp.arange(R * T).reshape(R, T)
    # The last position of each sequence (its target is the last response token, EOS).
    last = jax.ops.segment_max(
        jnp.where(index < total, flat, -1).ravel(), index.ravel(), total + 1
    )[:total]
    h = hidden.reshape(R * T, D)[jnp.maximum(last, 0)].astype(jnp.float32)
    head = params[HEAD]
    r = h @ head["kernel"][:, 0].astype(jnp.float32) + head["bias"][0].astype(jnp.float32)
    return jnp.where(last >= 0, r, 0.0)


def reward_objective(
    model_config, loss, loss_kwargs: dict | None = None, *, num_groups: int = 1
) -> Callable:
    """Bradley-Terry (or any loss on `chosen_rewards` / `rejected_rewards`) on pair batches:

    loss = -logsig(r_w - r_l - margin) + center_coef (r_w + r_l)^2   (`losses.bradley_terry`),

    `margin` a per-pair data field when the batch carries one. Metrics: rewards/accuracy
    (r_w > r_l), rewards/margin, rewards/chosen, rewards/rejected."""
    loss = steps.as_loss(loss, loss_kwargs)

    def objective(params, ref_params, micro, loss_state=None):
        del ref_params, loss_state
        per_group = 2 * micro["example_mask"].shape[0] // num_groups
        r = sequence_rewards(model_config, params, micro, per_group, num_groups)
        inputs = steps._data_fields(micro)
        inputs["chosen_rewards"], inputs["rejected_rewards"] = steps.split_pairs(r, num_groups)
        per_pair, metrics = loss(inputs)
        weight = micro["example_mask"]
        return (per_pair * weight).sum(), weight.sum(), steps._weighted(metrics, weight)

    objective.initial_loss_state = None
    return objective


def score(model_config, params, batch, num_sequences: int | None = None) -> jax.Array:
    """Rewards [S] of the S sequences of one host batch; S defaults to the SFT / unpaired layout's
    batch size (sequence i is example i); pass 2P for a pair batch (chosen, then rejected)."""
    S = num_sequences or batch["example_mask"].shape[0]
    arrays = {k: jnp.asarray(v) for k, v in batch.items() if k != "records"}
    return _score(model_config, params, arrays, S, 1)


_score = jax.jit(sequence_rewards, static_argnums=(0, 3, 4))


def load_reward_model(workdir: str | pathlib.Path):
    """(model_config, params with "reward_head") from the latest checkpoint of a reward run."""
    from jaxalign.checkpoint import manager as ckpt
    from jaxalign.checkpoint.convert import read_model_config

    model_config = read_model_config(workdir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = with_head(models.abstract_params(model_config), abstract_head(model_config))
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
    )
    return model_config, ckpt.load_params(workdir, abstract)


__all__ = [
    "HEAD",
    "abstract_head",
    "decoder_params",
    "head_logical_axes",
    "init_head",
    "load_reward_model",
    "reward_objective",
    "score",
    "sequence_rewards",
    "with_head",
]
