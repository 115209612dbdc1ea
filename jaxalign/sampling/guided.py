"""Decoding-time alignment: the next token is drawn from a combination of several models'
next-token distributions, each model with its own KV cache, inside the one jitted decode loop
of `jaxalign.sampling.decode` (METHODS.md section 6).

Per step every model m gives log-probs l_m = log_softmax(z_m) ``[R, V]`` of the same prefix
(all models share one tokenizer, so one vocabulary: `check_vocabularies`) and a pure rule
combines them into the log-probs l of the distribution the token is chosen from:

- EFT / up-scaling / proxy tuning (Mitchell et al. 2024, "An Emulator for Fine-Tuning Large
  Language Models using Small Language Models"; Liu et al. 2024, "Tuning Language Models by
  Proxy"): l = log_softmax(l_large_base + alpha (l_small_tuned - l_small_base));
- nudging (Fei et al. 2024, "Nudging: Inference-time Alignment via Model Collaboration"): the
  base model decodes; at a step where its top-1 probability max_v p_base(v) < gamma the aligned
  model emits the token: l = l_aligned there, l = l_base elsewhere. The unit is one *token*
  (the paper lets the aligned model finish a word); the top-1 probability is the base model's
  own at temperature 1, before any penalty or truncation;
- GenARM (Xu et al. 2025, "GenARM: Reward Guided Generation with Autoregressive Reward Model for
  Test-time Alignment"): p ∝ p_base prod_i p_arm_i^(w_i / beta), i.e.
  l = log_softmax(l_base + (1 / beta) sum_i w_i l_arm_i), each ARM a causal LM.

Then the usual options apply to l as to one model's logits (penalties, temperature, top-k, top-p,
min-p; `SamplingOptions`). In the result, ``logprobs`` are the log-probs of each token under
the combined distribution, log_softmax(l / T)[y] (l[y] at T = 0), and ``policy_logprobs`` the
first model's own log_softmax(z_0)[y] (the large base for EFT, the base for nudging and GenARM).

The weights (alpha, gamma, w_i / beta) are traced values carried through the loop: a new value
never recompiles. The number of models is static.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float

from jaxalign import models as M
from jaxalign.errors import ConfigError
from jaxalign.sampling.engine import decode
from jaxalign.sampling.options import SamplingOptions
from jaxalign.sampling.result import GenerateResult
from jaxalign.sharding import ShardingRules

Model = tuple[M.ModelConfig, M.Params]
LogProbs = Float[Array, "R V"]

# Model roles of each method, in the order `decode` gets them (model 0 gives policy_logprobs).
ROLES = {
    "eft": ("large_base", "small_tuned", "small_base"),
    "nudging": ("base", "aligned"),
    "genarm": ("base", "arms"),
    "search": ("policy", "value"),  # jaxalign.sampling.search
}


def eft_logprobs(
    large_base: LogProbs, small_tuned: LogProbs, small_base: LogProbs, alpha: Float[Array, ""]
) -> LogProbs:
    """EFT / proxy tuning: log_softmax(l_large_base + alpha (l_small_tuned - l_small_base))."""
    return jax.nn.log_softmax(large_base + alpha * (small_tuned - small_base), axis=-1)


def nudging_logprobs(base: LogProbs, aligned: LogProbs, gamma: Float[Array, ""]) -> LogProbs:
    """Nudging: per row, the aligned model's log-probs where the base model's top-1 probability
    exp(max_v l_base(v)) is below gamma, the base model's otherwise."""
    uncertain = jnp.exp(jnp.max(base, axis=-1, keepdims=True)) < gamma
    return jnp.where(uncertain, aligned, base)


def genarm_logprobs(
    base: LogProbs, arms: Sequence[LogProbs], coefs: Float[Array, " A"]
) -> LogProbs:
    """GenARM: log_softmax(l_base + sum_i c_i l_arm_i) with c_i = w_i / beta."""
    total = base
    for i, arm in enumerate(arms):
        total = total + coefs[i] * arm
    return jax.nn.log_softmax(total, axis=-1)


# The combine rules `decode` runs: module-level functions, so the compiled loop is reused.
def _eft(logps: list[LogProbs], state: dict, _step: dict) -> tuple[LogProbs, dict]:
    return eft_logprobs(*logps, state["alpha"]), state


def _nudging(logps: list[LogProbs], state: dict, _step: dict) -> tuple[LogProbs, dict]:
    return nudging_logprobs(logps[0], logps[1], state["gamma"]), state


def _genarm(logps: list[LogProbs], state: dict, _step: dict) -> tuple[LogProbs, dict]:
    return genarm_logprobs(logps[0], logps[1:], state["coefs"]), state


def check_vocabularies(models: Mapping[str, Model]) -> None:
    """`ConfigError` unless every model has the same vocabulary size (the methods combine
    distributions over one tokenizer's ids); ``models`` maps a name for the message to a model."""
    sizes = {name: config.vocab_size for name, (config, _) in models.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}: {size}" for name, size in sizes.items())
        raise ConfigError(
            f"guided decoding combines models over one vocabulary, but their vocabulary sizes "
            f"differ ({listed} tokens)"
        )


def _finite(name: str, value: float) -> np.float32:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise ConfigError(f"{name}={value!r}: expected a finite number")
    return np.float32(value)


def eft_state(alpha: float) -> dict:
    """EFT's traced weights (`ConfigError` for a non-finite alpha)."""
    return {"alpha": _finite("alpha", alpha)}


def nudging_state(gamma: float) -> dict:
    """Nudging's traced threshold (`ConfigError` unless gamma is a number >= 0)."""
    if _finite("gamma", gamma) < 0:
        raise ConfigError(f"gamma={gamma!r}: expected a probability threshold >= 0")
    return {"gamma": np.float32(gamma)}


def genarm_state(beta: float, weights: Sequence[float] | None, n_arms: int) -> dict:
    """GenARM's traced coefficients c_i = w_i / beta (w_i default 1); `ConfigError` for no arm,
    a weight count other than the arms', a non-finite weight or beta <= 0."""
    if n_arms < 1:
        raise ConfigError("genarm needs at least one autoregressive reward model (arms)")
    weights = [1.0] * n_arms if weights is None else list(weights)
    if len(weights) != n_arms:
        raise ConfigError(f"genarm: {len(weights)} weights for {n_arms} arms (one per arm)")
    if _finite("beta", beta) <= 0:
        raise ConfigError(f"beta={beta!r}: expected > 0")
    coefs = np.array([_finite(f"weights[{i}]", w) for i, w in enumerate(weights)]) / beta
    return {"coefs": coefs.astype(np.float32)}


def _guided(models: dict, combine, state, prompts: dict, **place) -> GenerateResult:
    """Decode with `combine` over `models` (named for errors; same vocabulary) in one loop."""
    check_vocabularies(models)
    return decode(tuple(models.values()), combine, prompts, combine_state=state, **place)


def eft(
    large_base: Model,
    small_tuned: Model,
    small_base: Model,
    prompts: dict,
    *,
    rng: Array,
    options: SamplingOptions,
    alpha: float = 1.0,
    tokenizer=None,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> GenerateResult:
    """EFT / proxy tuning: tokens from log_softmax(l_large_base + alpha (l_small_tuned -
    l_small_base)) (module docstring). Each model is ``(config, params)``; alpha = 1 transfers
    the small models' fine-tuning delta, alpha > 1 extrapolates it, alpha = 0 is the large base."""
    models = {"large_base": large_base, "small_tuned": small_tuned, "small_base": small_base}
    place = dict(rng=rng, options=options, tokenizer=tokenizer, mesh=mesh, rules=rules)
    return _guided(models, _eft, eft_state(alpha), prompts, **place)


def nudging(
    base: Model,
    aligned: Model,
    prompts: dict,
    *,
    rng: Array,
    options: SamplingOptions,
    gamma: float = 0.4,
    tokenizer=None,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> GenerateResult:
    """Nudging: the base model decodes; a token where its top-1 probability is below ``gamma`` is
    drawn from the aligned model instead (module docstring; unit: one token). gamma = 0 is the
    base model alone, gamma > 1 the aligned model alone."""
    models = {"base": base, "aligned": aligned}
    place = dict(rng=rng, options=options, tokenizer=tokenizer, mesh=mesh, rules=rules)
    return _guided(models, _nudging, nudging_state(gamma), prompts, **place)


def genarm(
    base: Model,
    arms: Sequence[Model],
    prompts: dict,
    *,
    rng: Array,
    options: SamplingOptions,
    beta: float = 1.0,
    weights: Sequence[float] | None = None,
    tokenizer=None,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> GenerateResult:
    """GenARM: tokens from log_softmax(l_base + (1 / beta) sum_i w_i l_arm_i) (module
    docstring). ``arms``: one or more autoregressive reward models (causal LMs) ``(config,
    params)``; ``weights`` w_i default to 1 each (multi-objective: one weight per ARM)."""
    state = genarm_state(beta, weights, len(arms))
    models = {"base": base} | {f"arms[{i}]": arm for i, arm in enumerate(arms)}
    place = dict(rng=rng, options=options, tokenizer=tokenizer, mesh=mesh, rules=rules)
    return _guided(models, _genarm, state, prompts, **place)
