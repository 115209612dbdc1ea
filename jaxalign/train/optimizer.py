"""AdamW with linear warmup, cosine decay and global-norm clipping."""

from __future__ import annotations

import jax
import optax
from ml_collections import ConfigDict


def learning_rate_schedule(
    opt: ConfigDict, steps: int, updates_per_step: int = 1
) -> optax.Schedule:
    """Linear warmup 0 -> lr over `warmup_steps`, then cosine decay to lr * end_lr_ratio, over
    `steps` loop steps; the schedule is called with the optimizer's update count, and a loop step
    that makes `updates_per_step` updates (an online step: rl.epochs x rl.minibatches) keeps one
    learning rate for all of them."""
    warmup = min(opt.warmup_steps, max(steps - 1, 0))
    per_step = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else opt.lr,
        peak_value=opt.lr,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=opt.lr * opt.end_lr_ratio,
    )
    if updates_per_step == 1:
        return per_step
    return lambda count: per_step(count // updates_per_step)


def _decay_mask(params):
    """Weight decay on weight matrices and the embedding; norm scales and biases are exempt."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: not any(getattr(k, "key", None) in ("scale", "bias") for k in path), params
    )


def make_optimizer(
    opt: ConfigDict, steps: int, updates_per_step: int = 1
) -> optax.GradientTransformation:
    """AdamW (+ clipping); with `opt.skip_nonfinite` = k > 0 wrapped in `optax.apply_if_finite`:
    an update whose gradients hold a NaN or Inf is skipped (params and moments unchanged), up to
    k in a row."""
    chain = []
    if opt.clip_norm:
        chain.append(optax.clip_by_global_norm(opt.clip_norm))
    chain.append(
        optax.adamw(
            learning_rate_schedule(opt, steps, updates_per_step),
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=_decay_mask,
        )
    )
    tx = optax.chain(*chain)
    return optax.apply_if_finite(tx, opt.skip_nonfinite) if opt.skip_nonfinite else tx
