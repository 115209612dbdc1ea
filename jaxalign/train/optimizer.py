"""AdamW with linear warmup, cosine decay and global-norm clipping."""

from __future__ import annotations

import jax
import optax
from ml_collections import ConfigDict


def learning_rate_schedule(opt: ConfigDict, steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr over `warmup_steps`, then cosine decay to lr * end_lr_ratio."""
    warmup = min(opt.warmup_steps, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else opt.lr,
        peak_value=opt.lr,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=opt.lr * opt.end_lr_ratio,
    )


def _decay_mask(params):
    """Weight decay on weight matrices and the embedding; norm scales and biases are exempt."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: not any(getattr(k, "key", None) in ("scale", "bias") for k in path), params
    )


def make_optimizer(opt: ConfigDict, steps: int) -> optax.GradientTransformation:
    """AdamW (+ clipping); with `opt.skip_nonfinite` = k > 0 wrapped in `optax.apply_if_finite`:
    an update whose gradients hold a NaN or Inf is skipped (params and moments unchanged), up to
    k in a row."""
    chain = []
    if opt.clip_norm:
        chain.append(optax.clip_by_global_norm(opt.clip_norm))
    chain.append(
        optax.adamw(
            learning_rate_schedule(opt, steps),
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=_decay_mask,
        )
    )
    tx = optax.chain(*chain)
    return optax.apply_if_finite(tx, opt.skip_nonfinite) if opt.skip_nonfinite else tx
