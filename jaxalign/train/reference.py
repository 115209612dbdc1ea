"""The reference policy's schedule (`config.reference`): a soup as the reference, and a reference
that follows the policy.

- **Soup reference** (SALSA, Chegini et al. 2024): `reference.soup = ("checkpoint:A", "hf:B",
  ...)` makes the reference the average of these models' weights, `ref = (1/n) sum_i theta_i`,
  computed in float32 one model at a time and stored in the params' dtype, instead of the initial
  policy.
- **TR-DPO** (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"):
  `reference.update = "soft"` sets `ref <- alpha * policy + (1 - alpha) * ref` after every
  `reference.every`-th optimizer step (alpha 0.6, every 512 in the paper's defaults); `"hard"`
  copies the policy (`alpha = 1`). The reference then changes during the run, so it is part of
  the checkpoint (`state["ref"]`) and a resumed run continues with the reference it had.

Both apply to the offline families that hold reference weights (`paired`, `unpaired` with a
reference-based loss); a soup, being fixed, also to the online families that hold one (`spa`
starts from a DPO run and keeps the SFT model as its reference); `setup` refuses them elsewhere
with the reason.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from jaxalign import models
from jaxalign.errors import ConfigError

UPDATES = ("", "soft", "hard")


def update_rule(config: ConfigDict) -> str:
    """`reference.update` ("", "soft", "hard"); read by item: `ConfigDict.update` is a method."""
    return config.reference["update"]


def check(config: ConfigDict, *, loop: str, needs_ref: bool) -> None:
    """One-line ConfigErrors for a reference schedule this run cannot have."""
    ref, update = config.reference, update_rule(config)
    if update not in UPDATES:
        raise ConfigError(f'reference.update="{update}": expected "", "soft" or "hard"')
    if not (update or ref.soup):
        return
    key = "reference.update" if update else "reference.soup"
    if loop != "offline" and update:  # a fixed soup reference serves online runs too (spa)
        raise ConfigError(
            f'{key}: reference schedules are for the offline families (paired, unpaired), not "'
            f'{config.trainer}"'
        )
    if config.lora.rank:
        raise ConfigError(
            f"{key}: a LoRA run's reference is its base with the adapters off (lora.rank="
            f"{config.lora.rank}); train without LoRA to change the reference"
        )
    if update and config.data.ref_logps:
        raise ConfigError(
            "reference.update: a reference that changes during the run cannot be cached "
            f"(data.ref_logps={config.data.ref_logps})"
        )
    if not needs_ref and not config.data.ref_logps:
        loss = config.loss.get("name", "")
        raise ConfigError(f'{key}: the loss "{loss}" uses no reference policy')
    if update and not (0.0 < ref.alpha <= 1.0):
        raise ConfigError(f"reference.alpha={ref.alpha}: expected 0 < alpha <= 1")
    if update and ref.every < 1:
        raise ConfigError(f"reference.every={ref.every}: expected a step count >= 1")
    if isinstance(ref.soup, str) or not all(isinstance(s, str) for s in ref.soup):
        raise ConfigError(
            f"reference.soup={ref.soup!r}: expected a tuple of model specs, e.g. "
            '("checkpoint:runs/a", "hf:models/b")'
        )
    for spec in ref.soup:
        if spec.partition(":")[0] not in ("checkpoint", "hf") or not spec.partition(":")[2]:
            raise ConfigError(f'reference.soup: "{spec}": expected "checkpoint:DIR" or "hf:DIR"')


def architecture(spec: str) -> models.ModelConfig:
    """The architecture recorded where `spec` points, without reading weights."""
    kind, _, where = spec.partition(":")
    if kind == "hf":
        from jaxalign.checkpoint import load_hf_config

        return load_hf_config(where)
    from jaxalign.checkpoint.convert import read_model_config

    return read_model_config(where)


def check_soup_member(spec: str, model_config: models.ModelConfig) -> None:
    """A soup member must have the policy's architecture: the same tensors with the same shapes
    (the first difference is named), then the same model settings."""
    member = architecture(spec)
    want = jax.tree_util.tree_flatten_with_path(models.abstract_params(model_config))[0]
    have = dict(jax.tree_util.tree_flatten_with_path(models.abstract_params(member))[0])
    for path, leaf in want:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        other = have.get(path)
        if other is None or other.shape != leaf.shape:
            shape = "missing" if other is None else f"shape {tuple(other.shape)}"
            raise ConfigError(
                f'reference.soup: "{spec}": tensor {name} is {shape}, the policy\'s is '
                f"{tuple(leaf.shape)} (a different architecture or vocabulary)"
            )
    ignore = {"dtype", "param_dtype", "remat", "attention", "lora", "name"}
    for field in dataclasses.fields(model_config):
        if field.name in ignore:
            continue
        a, b = getattr(model_config, field.name), getattr(member, field.name)
        if a != b:
            raise ConfigError(
                f'reference.soup: "{spec}": model setting {field.name}={b!r}, the policy\'s is '
                f"{a!r}"
            )


def soup(specs, load, model_config, shardings):
    """`(1/n) sum_i theta_i` of the models `specs` (`load(spec) -> params` in `shardings`), added
    up in float32 one model at a time (two trees held: the sum and the model being added), and
    returned in the params' dtype."""
    for spec in specs:
        check_soup_member(spec, model_config)
    add = jax.jit(
        lambda total, p: jax.tree.map(lambda t, x: t + x.astype(jnp.float32), total, p),
        donate_argnums=0,
        out_shardings=shardings,
    )
    total = None
    for spec in specs:
        params = load(spec)
        if total is None:
            total = jax.jit(
                lambda p: jax.tree.map(lambda x: x.astype(jnp.float32), p),
                out_shardings=shardings,
            )(params)
        else:
            total = add(total, params)
        del params
    dtypes = jax.tree.map(lambda a: a.dtype, models.abstract_params(model_config))
    scale = 1.0 / len(specs)
    return jax.jit(
        lambda t: jax.tree.map(lambda x, d: (x * scale).astype(d), t, dtypes),
        donate_argnums=0,
        out_shardings=shardings,
    )(total)


def make_update(config: ConfigDict, shardings):
    """The jitted TR-DPO update `(ref, params) -> alpha * params + (1 - alpha) * ref` (float32
    arithmetic, stored in the reference's dtype; `ref` donated), or None for a fixed reference."""
    update = update_rule(config)
    if not update:
        return None
    alpha = 1.0 if update == "hard" else float(config.reference.alpha)

    def follow(ref_params, params):
        def mix(r, p):
            mixed = alpha * p.astype(jnp.float32) + (1.0 - alpha) * r.astype(jnp.float32)
            return mixed.astype(r.dtype)

        return jax.tree.map(mix, ref_params, params)

    return jax.jit(follow, donate_argnums=0, out_shardings=shardings)


def due(config: ConfigDict, step: int) -> bool:
    """Whether the reference is updated after optimizer step `step` (1-based)."""
    return bool(update_rule(config)) and step % config.reference.every == 0
