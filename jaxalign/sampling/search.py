"""Search-time decoding: rerank the policy's top-k next tokens by log-prob plus a value estimate,
inside the one jitted decode loop of `jaxalign.sampling.decode` (METHODS.md section 6).

Controlled decoding (Mudgal et al. 2024, "Controlled Decoding from Language Models"), Transfer
Q* (Chakraborty et al. 2024, "Transfer Q Star: Principled Decoding for LLM Alignment") and DeAL
(Huang et al. 2024, "DeAL: Decoding-time Alignment for Large Language Models") share one step
rule; jaxalign builds it with a value model's scalar head:

    C_t  = the k tokens of highest policy log-prob l(v) = log_softmax(z_policy)(v)  (T = 1),
    s(c) = l(c) + alpha * V(x, y_<t, c)   for c in C_t,   s(v) = -inf otherwise,

and the token is chosen from the scores s as from logits, with the sampling options: temperature
0 takes argmax_c s(c) (greedy search, one token deep), temperature T > 0 samples from
softmax(s / T) over the k candidates (the KL-regularised policy pi ∝ p exp(alpha V) of CD / Q*
restricted to the top k, at T = 1); top-p, min-p and penalties then act on s. ``logprobs`` of the
result are log_softmax(s / T)[y] (log_softmax(s)[y] at T = 0), ``policy_logprobs`` the policy's
own log-probs.

V(x, y_<t, c) is the value model's head (`jaxalign.models.heads.apply_scalar_head`) on its hidden
state at the candidate's position, the candidate run after x, y_<t: with a PPO checkpoint's
``value_head`` that is the critic's value of the state ending in c (the trainer's convention:
position c values the state whose next token follows c); with a reward model's ``reward_head`` it
is the reward of x, y_<t, c followed by one more token (the reward trainer reads the head at the
input whose target is the last token, EOS for a finished answer), i.e. the reward of stopping
right after c. The value model shares the policy's tokenizer (one vocabulary) and may be the
policy itself (a PPO run's trunk and critic).

Cost per decode step, on top of the policy's one position: the value model runs 1 + k positions:
the chosen token into its cache (as every model of the loop), then the k candidates as one chunk
of k tokens that attend to the cache and each to itself only
(`Transformer.call_with_cache(alternatives=True)`). Their cache writes are dropped, which costs
one transient copy of the value model's KV cache per step; its cache has k - 1 spare slots; the
loop also computes its (unused) next-token logits, one [R, D] x [D, V] product. Value estimates
from short rollouts are not built: the value comes from a head only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from jaxalign import models as M
from jaxalign.errors import ConfigError
from jaxalign.models import heads
from jaxalign.sampling.engine import Combine, decode
from jaxalign.sampling.guided import Model, _finite, check_vocabularies
from jaxalign.sampling.options import SamplingOptions
from jaxalign.sampling.result import GenerateResult
from jaxalign.sharding import ShardingRules

HEADS = (heads.VALUE_HEAD, heads.REWARD_HEAD)


def candidate_values(
    config: M.ModelConfig,
    params: M.Params,
    head: dict,
    cache: dict[str, Array],
    candidates: Int[Array, "R C"],
    positions: Int[Array, " R"],
) -> Float[Array, "R C"]:
    """V of each of C candidate next tokens: the value model's head on its hidden state at
    ``positions`` with the candidate appended to what ``cache`` holds (the C candidates run as
    one chunk of alternatives; the cache is left as it was)."""
    at = jnp.broadcast_to(positions[:, None], candidates.shape)
    hidden, _ = M.bind(config, params).call_with_cache(candidates, at, cache, alternatives=True)
    return heads.apply_scalar_head(head, hidden)


def search_scores(
    policy_logps: Float[Array, "R V"],
    candidates: Int[Array, "R C"],
    values: Float[Array, "R C"],
    alpha: Float[Array, ""],
) -> Float[Array, "R V"]:
    """s(c) = l(c) + alpha V(c) on the candidates, -inf on every other token."""
    scores = jnp.take_along_axis(policy_logps, candidates, axis=-1) + alpha * values
    rows = jnp.arange(policy_logps.shape[0])[:, None]
    return jnp.full_like(policy_logps, -jnp.inf).at[rows, candidates].set(scores)


@functools.cache
def search_rule(k: int) -> Combine:
    """The decode loop's combine rule for k candidates (one function object per k, so the
    compiled loop is reused): model 0 the policy, model 1 the value model's decoder, its head
    and alpha in the carried state."""

    def combine(logps: list, state: dict, step: dict) -> tuple[Float[Array, "R V"], dict]:
        _, candidates = jax.lax.top_k(logps[0], k)
        values = candidate_values(
            step["configs"][1],
            step["params"][1],
            state["head"],
            step["caches"][1],
            candidates,
            step["positions"],
        )
        return search_scores(logps[0], candidates, values, state["alpha"]), state

    return combine


def search(
    policy: Model,
    value: Model,
    prompts: dict,
    *,
    rng: Array,
    options: SamplingOptions,
    alpha: float = 1.0,
    k: int = 4,
    head: str = heads.VALUE_HEAD,
    tokenizer=None,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> GenerateResult:
    """Search-time decoding (module docstring): per step the policy's top ``k`` tokens scored by
    l(c) + alpha V(x, y_<t, c), the token chosen from those scores under ``options``.

    ``policy``: ``(config, params)``; ``value``: ``(config, params)`` whose params hold the
    scalar head ``head`` ("value_head": a PPO run's critic; "reward_head": a reward model) next
    to the decoder. alpha = 0 is the policy alone (greedy: its argmax). `ConfigError` for k < 1
    or k above the vocabulary, a non-finite alpha, an unknown or missing head or a value model
    with another vocabulary."""
    config, params = value
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= policy[0].vocab_size:
        raise ConfigError(f"k={k!r}: expected a number of candidates in [1, vocabulary size]")
    if head not in HEADS:
        raise ConfigError(f"head={head!r}: expected one of {', '.join(HEADS)}")
    if head not in params:
        raise ConfigError(
            f'the value model has no "{head}" (a PPO run holds value_head, a reward run '
            "reward_head)"
        )
    check_vocabularies({"policy": policy, "value": value})
    state = {"alpha": _finite("alpha", alpha), "head": params[head]}
    models = (policy, (config, heads.decoder_params(params)))
    return decode(
        models,
        search_rule(k),
        prompts,
        rng=rng,
        options=options,
        combine_state=state,
        cache_margin=k - 1,
        tokenizer=tokenizer,
        mesh=mesh,
        rules=rules,
    )
