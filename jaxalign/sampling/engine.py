"""The decode loop: prefill and every decode step in one jitted function, on any mesh.

``decode(models, combine, prompts, ...)`` runs one or several models side by side, each with its
own params and KV cache: per step every model gives its next-token logits z_m ``[R, V]`` and
``combine(logps, state, step) -> (logits, state)`` turns their log-probs ``log_softmax(z_m)``
into the logits c the token is chosen from (guided decoding: EFT, nudging, GenARM, search-time
decoding plug in here; ``state`` is any pytree carried through the loop, e.g. per-row flags or
traced weights; ``step`` = {"configs", "params", "caches", "positions"}: the models, their
caches holding every token before the one being chosen, and its position ``[R]``, for rules
that run candidate tokens through a model). ``combine=None``
is the identity on model 0: c = z_0, its raw logits (the same distribution as log_softmax(z_0),
and the numbers the CTRL repetition penalty is defined on). ``generate`` is one model with
``combine=None``.

Layout of one call (B prompts, n samples each, R = B * n rows, M = max_new_tokens, prompts
left-padded to Tp so that every prompt ends at column Tp - 1):

1. prefill: each model runs the B prompts once into a cache of S = Tp + M slots
   (`jaxalign.models.init_cache`, allocated inside the jitted function and updated in place by
   the loop, so there is nothing to donate and no second copy); the caches and the first
   next-token log-probs are then repeated n times, row i = prompt i // n, sample i % n;
2. token 0 is chosen from the prefill log-probs;
3. ``lax.while_loop``: feed the last token of every row at its own position (prompt length + t)
   through ``forward_with_cache``, choose token t; stop when every row is done (a stop id or
   M tokens). Rows that are done keep running (static shapes) but record nothing.
4. one device-to-host transfer of tokens, lengths, finish flags and log-probs.

Static per compile: the models' configs, ``combine``, M, n, B, Tp, the number of stop ids and the
mesh. Everything numeric in `SamplingOptions` is a traced argument (never recompiles). The model
is bound from its params once per trace (`jaxalign.models.bind`), not per step.

Log-probs (per generated token, float32):

- ``policy_logprobs`` = log_softmax(z_0)[y], model 0's own log-prob at temperature 1;
- ``logprobs`` = log_softmax(c / T)[y] for the combined logits c (c = z_0 with one model) at
  T > 0, over the full vocabulary: before top-k / top-p / min-p truncation and without
  penalties. This is what RL's importance ratio needs and what the training kernels reproduce
  with ``token_logprobs(hidden / T, unembedding, targets)``. At T = 0 it is log_softmax(c)[y]:
  ``policy_logprobs`` with one model.

Mesh: params stay in the shardings they come in (e.g. their training shardings; never gathered
or copied by this module); prompt rows, the caches' rows and every per-row array are sharded over
the rules' "batch" axes and the caches' kv heads over the rules' "kv_heads" axes (dimensions that
do not divide fall back as in `jaxalign.sharding.logical_to_spec`). Multi-host: each process
passes its own prompts and gets back the rows of its own prompts (`gather_to_host0` collects them).

Over-long prompts are refused: a prompt of L tokens with L + max_new_tokens > the models'
``max_seq_len`` raises `ConfigError` naming the prompt (`check_prompt_lengths`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float

from jaxalign import models as M
from jaxalign.data.pipeline import default_length_buckets
from jaxalign.errors import ConfigError
from jaxalign.sampling.options import SamplingOptions
from jaxalign.sampling.result import GenerateResult, detokenize
from jaxalign.sampling.token_choice import choose_tokens
from jaxalign.sharding import ShardingRules, logical_to_spec, to_global, with_logical_constraint

Combine = Callable[[list[Float[Array, "R V"]], Any, dict], tuple[Float[Array, "R V"], Any]]
PROMPT_KEYS = ("prompt_tokens", "prompt_segment_ids", "prompt_positions", "prompt_lengths")
_CACHE_AXES = {
    "k": ("layers", "batch", None, "kv_heads", "head_dim"),
    "v": ("layers", "batch", None, "kv_heads", "head_dim"),
    "segment_ids": ("batch", None),
    "positions": ("batch", None),
    "index": (),
}


def prompts_from_ids(
    ids: Sequence[Sequence[int]], pad_id: int, buckets: Sequence[int] | None = None
) -> dict[str, np.ndarray]:
    """Left-padded prompt batch (the layout of `jaxalign.data.make_prompt_pipeline`) from token id
    lists: Tp = the smallest bucket >= the longest prompt (default buckets: powers of two from
    16, so few lengths compile)."""
    lengths = np.array([len(x) for x in ids], np.int32)
    longest = int(lengths.max(initial=1))
    buckets = sorted(buckets or default_length_buckets(max(longest, 16)))
    fitting = [b for b in buckets if b >= longest]
    if not fitting:
        raise ConfigError(f"a prompt has {longest} tokens, longer than every bucket {buckets}")
    Tp = fitting[0]
    B = len(ids)
    tokens = np.full((B, Tp), pad_id, np.int32)
    segment_ids = np.zeros((B, Tp), np.int32)
    positions = np.zeros((B, Tp), np.int32)
    for i, row in enumerate(ids):
        L = len(row)
        tokens[i, Tp - L :] = row
        segment_ids[i, Tp - L :] = 1
        positions[i, Tp - L :] = np.arange(L)
    return {
        "prompt_tokens": tokens,
        "prompt_segment_ids": segment_ids,
        "prompt_positions": positions,
        "prompt_lengths": lengths,
        "example_mask": np.ones(B, np.float32),
    }


def check_prompt_lengths(
    prompt_lengths: np.ndarray,
    max_new_tokens: int,
    max_seq_len: int,
    names: Sequence[str] | None = None,
) -> None:
    """Refuses any prompt with ``length + max_new_tokens > max_seq_len`` (`ConfigError` naming
    it: ``names[i]`` or "prompt i" of the batch)."""
    for i, L in enumerate(np.asarray(prompt_lengths).tolist()):
        if L + max_new_tokens > max_seq_len:
            name = names[i] if names is not None else f"prompt {i} of the batch"
            raise ConfigError(
                f"{name}: {L} prompt tokens + max_new_tokens {max_new_tokens} = "
                f"{L + max_new_tokens} exceed the model's max_seq_len {max_seq_len} (shorten the "
                "prompt or max_new_tokens)"
            )


def _constrain(x: Array, axes: tuple, mesh: Mesh | None, rules: ShardingRules) -> Array:
    if mesh is None:
        return x
    return with_logical_constraint(x, axes, rules, mesh)


def _rows(x: Array, mesh: Mesh | None, rules: ShardingRules) -> Array:
    return _constrain(x, ("batch",) + (None,) * (x.ndim - 1), mesh, rules)


def _constrain_cache(cache: dict, mesh: Mesh | None, rules: ShardingRules) -> dict:
    return {k: _constrain(v, _CACHE_AXES[k], mesh, rules) for k, v in cache.items()}


def _next_logits(config, params, hidden: Float[Array, "R D"]) -> Float[Array, "R V"]:
    return M.logits(config, params, hidden[:, None])[:, 0]


def _log_prob(z: Float[Array, "R V"], tokens: Array) -> Float[Array, " R"]:
    """log_softmax(z)[token] per row."""
    return jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(z, axis=-1)


@functools.partial(
    jax.jit,
    static_argnames=("configs", "combine", "max_new_tokens", "n", "cache_margin", "mesh", "rules"),
)
def _decode_loop(
    params: tuple,
    prompts: dict[str, Array],
    rng: Array,
    knobs: dict[str, Array],
    combine_state: Any,
    *,
    configs: tuple[M.ModelConfig, ...],
    combine: Combine | None,
    max_new_tokens: int,
    n: int,
    cache_margin: int = 0,
    mesh: Mesh | None,
    rules: ShardingRules,
) -> dict[str, Array]:
    """Prefill + the whole decode loop (module docstring); returns the per-row output arrays."""
    rows = functools.partial(_rows, mesh=mesh, rules=rules)
    # [R, V] arrays like the logits: rows over the batch axes, vocabulary as the unembedding's.
    vocab_rows = functools.partial(_constrain, axes=("batch", "vocab"), mesh=mesh, rules=rules)
    tokens = prompts["prompt_tokens"]
    B, Tp = tokens.shape
    R, steps = B * n, max_new_tokens
    bound = [M.bind(c, p) for c, p in zip(configs, params, strict=True)]

    caches, first = [], []
    for config, p, model in zip(configs, params, bound, strict=True):
        cache = _constrain_cache(M.init_cache(config, B, Tp + steps + cache_margin), mesh, rules)
        hidden, cache = model.call_with_cache(
            tokens, prompts["prompt_positions"], cache, prompts["prompt_segment_ids"]
        )
        first.append(rows(jnp.repeat(_next_logits(config, p, hidden[:, -1]), n, axis=0)))
        cache = {
            k: v if k == "index" else jnp.repeat(v, n, axis=1 if k in ("k", "v") else 0)
            for k, v in cache.items()
        }
        caches.append(_constrain_cache(cache, mesh, rules))

    V = first[0].shape[-1]
    prompt_seen = (
        jnp.zeros((B, V), bool)
        .at[jnp.arange(B)[:, None], tokens]
        .max(prompts["prompt_segment_ids"] > 0)
    )
    prompt_seen = vocab_rows(jnp.repeat(prompt_seen, n, axis=0))
    prompt_lengths = rows(jnp.repeat(prompts["prompt_lengths"], n))
    temperature = knobs["temperature"]

    def advance(state: dict, logits: list[Array], t: Array) -> dict:
        """Choose token t of every row from the models' logits and record it."""
        combined, combine_state = logits[0], state["combine_state"]
        if combine is not None:
            logps = [jax.nn.log_softmax(z, axis=-1) for z in logits]
            step = {
                "configs": configs,
                "params": params,
                "caches": state["caches"],
                "positions": prompt_lengths + t,
            }
            combined, combine_state = combine(logps, combine_state, step)
        token = choose_tokens(
            jax.random.fold_in(rng, t), combined, prompt_seen, state["seen"], knobs
        )
        policy = _log_prob(logits[0], token)
        # At T = 0 and T = 1 the sampling log-prob is log_softmax(c)[y], with one model the
        # policy's own: no second pass over the vocabulary.
        sampling = lax.cond(
            (temperature > 0) & (temperature != 1),
            lambda: _log_prob(combined / temperature, token),
            lambda: policy if combine is None else _log_prob(combined, token),
        )
        active = ~state["done"]
        stop = active & jnp.any(token[:, None] == knobs["stop_ids"][None, :], axis=-1)

        def column(out, x):
            return lax.dynamic_update_slice(out, x[:, None], (0, t))

        return {
            **state,
            "last": token,
            "tokens": column(state["tokens"], jnp.where(active, token, knobs["pad_id"])),
            "logprobs": column(state["logprobs"], jnp.where(active, sampling, 0.0)),
            "policy_logprobs": column(state["policy_logprobs"], jnp.where(active, policy, 0.0)),
            "lengths": state["lengths"] + active,
            "stopped": state["stopped"] | stop,
            "done": state["done"] | stop | (t + 1 >= steps),
            "seen": vocab_rows(state["seen"].at[jnp.arange(R), token].max(active)),
            "combine_state": combine_state,
        }

    state = {
        "t": jnp.int32(1),
        "caches": caches,
        "last": jnp.zeros((R,), jnp.int32),
        "tokens": rows(jnp.full((R, steps), knobs["pad_id"], jnp.int32)),
        "logprobs": rows(jnp.zeros((R, steps), jnp.float32)),
        "policy_logprobs": rows(jnp.zeros((R, steps), jnp.float32)),
        "lengths": rows(jnp.zeros((R,), jnp.int32)),
        "stopped": rows(jnp.zeros((R,), bool)),
        "done": prompt_lengths == 0,  # empty batch slots are not generated
        "seen": vocab_rows(jnp.zeros((R, V), bool)),
        "combine_state": combine_state,
    }
    state = advance(state, first, jnp.int32(0))

    def cond(state):
        return (state["t"] < steps) & ~jnp.all(state["done"])

    def body(state):
        t = state["t"]
        positions = (prompt_lengths + t - 1)[:, None]
        caches, logits = [], []
        for config, p, model, cache in zip(configs, params, bound, state["caches"], strict=True):
            hidden, cache = model.call_with_cache(
                state["last"][:, None], positions, cache, mesh=mesh
            )
            caches.append(_constrain_cache(cache, mesh, rules))
            logits.append(_next_logits(config, p, hidden[:, 0]))
        state = advance({**state, "caches": caches}, logits, t)
        return {**state, "t": t + 1}

    state = lax.while_loop(cond, body, state)
    keys = ("tokens", "lengths", "stopped", "logprobs", "policy_logprobs")
    return {k: state[k] for k in keys}


def knobs(options: SamplingOptions) -> dict[str, np.ndarray]:
    """The traced option values of the loop (one dtype each, so new values never recompile)."""
    return {
        "temperature": np.float32(options.temperature),
        "top_k": np.int32(options.top_k),
        "top_p": np.float32(options.top_p),
        "min_p": np.float32(options.min_p),
        "repetition_penalty": np.float32(options.repetition_penalty),
        "presence_penalty": np.float32(options.presence_penalty),
        "stop_ids": np.asarray(options.stop_ids, np.int32).reshape(-1),
        "pad_id": np.int32(options.pad_id),
    }


def _params_mesh(params: Any) -> Mesh | None:
    """The mesh of the params' NamedShardings when they span several devices, else None."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return sharding.mesh
    return None


def _place(
    arrays: dict[str, np.ndarray], n: int, mesh: Mesh | None, rules: ShardingRules
) -> tuple[dict, int]:
    """Host prompt rows -> device arrays with rows over the batch axes, and the number of times
    the loop repeats each row (n, or 1 when the rows were repeated here).

    On one process, rows that do not divide the row shards fall back as in `logical_to_spec`. On
    several, each passes its own rows (`jaxalign.sharding.to_global`), which must split evenly
    over its row shards: when the B prompts do not but the B * n samples do, the prompts are
    repeated n times here and prefilled as B * n rows (same rows, same tokens, n times the
    prefill work)."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in arrays.items()}, n
    if jax.process_count() > 1:
        try:
            return to_global(arrays, mesh, rules), n
        except ValueError:
            pass
        try:
            repeated = {k: np.repeat(v, n, axis=0) for k, v in arrays.items()}
            return to_global(repeated, mesh, rules), 1
        except ValueError as e:
            raise ConfigError(f"prompts x n samples: {e}") from None
    out = {}
    for k, v in arrays.items():
        axes = ("batch",) + (None,) * (v.ndim - 1)
        spec = logical_to_spec(axes, rules, shape=v.shape, mesh=mesh, name=k)
        out[k] = jax.device_put(v, NamedSharding(mesh, spec))
    return out, n


def _to_host(out: dict[str, Array], mesh: Mesh | None, rules: ShardingRules) -> dict:
    """One device-to-host transfer; on several processes each keeps the rows of its prompts."""
    if jax.process_count() > 1:
        spec = PartitionSpec(rules.mesh_axes("batch"))
        out = multihost_utils.global_array_to_host_local_array(out, mesh, spec)
    return jax.device_get(out)


def decode(
    models: Sequence[tuple[M.ModelConfig, M.Params]],
    combine: Combine | None,
    prompts: dict,
    *,
    rng: Array,
    options: SamplingOptions,
    combine_state: Any = (),
    cache_margin: int = 0,
    tokenizer=None,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> GenerateResult:
    """Samples ``options.n`` completions per prompt from ``combine`` of several models.

    ``models``: ``((config, params), ...)``, each with its own KV cache; they share the prompt
    tokens (one tokenizer). ``combine(logps, state, step) -> (logits, state)`` gets the list of
    ``[R, V]`` log_softmax rows of every model, the carried ``state`` (initially
    ``combine_state``; keep numeric weights there, since ``combine`` itself is a static argument:
    pass the same function object to reuse the compiled loop) and the ``step`` dict (module
    docstring); ``None`` chooses from model 0's own logits. ``policy_logprobs`` are always model
    0's. ``cache_margin``: KV slots every cache gets past the prompt and the generated tokens
    (for candidate tokens a rule runs through a cache: `jaxalign.sampling.search`).
    ``prompts``: the batch layout of `jaxalign.data.make_prompt_pipeline` (other keys such as
    "records" and "example_mask" are ignored). ``tokenizer``: needed for ``stop_strings``; when
    given, the result carries ``text``. ``mesh``/``rules``: where to run (default: the mesh of
    model 0's params when they span several devices, rows over ``rules.batch``; rules default to
    `ShardingRules()`). See the module docstring for the loop and the log-prob definitions.
    """
    configs = tuple(config for config, _ in models)
    params = tuple(p for _, p in models)
    if options.stop_strings and tokenizer is None:
        raise ConfigError("sampling option stop_strings needs a tokenizer to detokenise with")
    vocab = min(c.vocab_size for c in configs)
    bad = [i for i in options.stop_ids if i >= vocab]
    if bad:
        raise ConfigError(f"stop/EOS token ids {bad} are outside the model's vocabulary ({vocab})")
    missing = [k for k in PROMPT_KEYS if k not in prompts]
    if missing:
        raise ConfigError(f"prompts lack {missing} (expected the layout of make_prompt_pipeline)")
    arrays = {k: np.asarray(prompts[k], np.int32) for k in PROMPT_KEYS}
    max_seq_len = min(c.max_seq_len for c in configs)
    check_prompt_lengths(arrays["prompt_lengths"], options.max_new_tokens, max_seq_len)
    mesh = mesh if mesh is not None else _params_mesh(params[0])
    rules = rules if rules is not None else ShardingRules()
    placed, n = _place(arrays, options.n, mesh, rules)
    out = _decode_loop(
        params,
        placed,
        rng,
        knobs(options),
        combine_state,
        configs=configs,
        combine=combine,
        max_new_tokens=options.max_new_tokens,
        n=n,
        cache_margin=cache_margin,
        mesh=mesh,
        rules=rules,
    )
    out = _to_host(out, mesh, rules)
    rows = out["tokens"].shape[0]
    result = GenerateResult(
        tokens=out["tokens"],
        lengths=out["lengths"],
        finish_reason=np.where(out["stopped"], "stop", "length").astype(object),
        logprobs=out["logprobs"],
        policy_logprobs=out["policy_logprobs"],
        prompt_index=(np.arange(rows) // options.n).astype(np.int32),
    )
    if tokenizer is not None:
        result = detokenize(result, tokenizer, options.stop_strings, options.pad_id)
    return result


def lower_generate(
    model_config: M.ModelConfig,
    params: M.Params,
    prompts: dict,
    *,
    options: SamplingOptions,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> jax.stages.Lowered:
    """`generate`'s jitted prefill + decode loop lowered for these inputs without running it:
    ``params`` and the `PROMPT_KEYS` arrays of ``prompts`` may be `jax.ShapeDtypeStruct`s with
    their shardings (compile-only planning: nothing is allocated). The key and the option values
    are placed replicated on ``mesh``. ``.compile()`` the result for its memory and cost analyses.
    """
    rules = rules if rules is not None else ShardingRules()
    rng = jax.eval_shape(lambda: jax.random.key(0))
    values = knobs(options)
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated)
        values = {
            k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=replicated)
            for k, v in values.items()
        }
    return _decode_loop.lower(
        (params,),
        {k: prompts[k] for k in PROMPT_KEYS},
        rng,
        values,
        (),
        configs=(model_config,),
        combine=None,
        max_new_tokens=options.max_new_tokens,
        n=options.n,
        mesh=mesh,
        rules=rules,
    )


def generate(
    model_config: M.ModelConfig,
    params: M.Params,
    prompts: dict,
    *,
    rng: Array,
    options: SamplingOptions,
    tokenizer=None,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> GenerateResult:
    """``options.n`` completions per prompt from one model: `decode` with ``combine=None``.

    ``logprobs`` are log_softmax(z / T) of the full vocabulary (before truncation, without
    penalties), ``policy_logprobs`` log_softmax(z); the EOS / stop token that ends a row is part
    of its completion. Same ``rng``, options and inputs give the same tokens.
    """
    return decode(
        ((model_config, params),),
        None,
        prompts,
        rng=rng,
        options=options,
        tokenizer=tokenizer,
        mesh=mesh,
        rules=rules,
    )
