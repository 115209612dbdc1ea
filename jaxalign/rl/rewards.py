"""Rewards for online RL (METHODS.md section 4, reward rows of section 5): rule rewards and their
weighted composition, running-std reward scaling (PPO-max), the DAPO overlong penalty, the LSC
transform and InfAlign's calibrate-and-transform.

Rule rewards run on the host: a reward is a plain callable ``reward(record, completion) ->
float``, ``record`` the prompt's data record (a dict, e.g. ``{"prompt": ..., "answer": ...}``)
and ``completion`` the decoded completion text. A config names them::

    c.rl.rewards = (("demo_judge", 1.0), ("format", 0.1, {"pattern": r"\\d+"}),
                    ("length", {"start": 0.0, "end": 0.5, "steps": 100}, {"target": 3}))
    specs = rewards_from_config(c.rl.rewards)           # ConfigError on unknown names / params
    total, per_fn = score_rule_rewards(specs, records, completions, step)   # [B] float32, host
    stats = update_reward_stats(stats, total)            # PPO-max: running moments, then
    scaled = scale_rewards(total, stats, clip=5.0)       # divide by the running std and clip

``records[i]`` is the record of completion i (repeat each prompt's record G times). A reward that
raises or returns a non-finite number raises ``DataError`` naming the reward and the record index;
the loop refuses the step. The array functions (scaling, overlong penalty, LSC, InfAlign) are
pure JAX and jittable. ``reward_model_scores`` scores rollout rows with a trained reward model
(a decoder with ``params["reward_head"]``, `jaxalign.models.heads`).
"""

import collections
import dataclasses
import difflib
import functools
import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from jaxalign import models
from jaxalign.data.demo_task import judge
from jaxalign.errors import ConfigError, DataError
from jaxalign.losses.reward import lsc_combine, lsc_transform
from jaxalign.models import heads

RewardFn = Callable[[Mapping[str, Any], str], float]
Weight = float | Callable[[int], float]
RewardStats = dict[str, Float[Array, ""]]
SeqArray = Float[Array, "B"]
HostSeq = Float[np.ndarray, "B"]
SeqLike = Float[ArrayLike, "B"]

# --------------------------------------------------------------------------------------------------
# Rule rewards (host side).


def demo_judge(record: Mapping[str, Any], completion: str) -> float:
    """The demo task's judge (``jaxalign.data.demo_task.judge``): 1.0 if the completion is the
    right answer to ``record["prompt"]``, else 0.0."""
    return judge(record["prompt"], completion)


def format_reward(pattern: str) -> RewardFn:
    """1.0 if the whole completion matches the regular expression ``pattern`` (``re.fullmatch``
    with ``re.DOTALL``, so ``.`` spans newlines), else 0.0. A bad pattern is a ConfigError."""
    try:
        regex = re.compile(pattern, re.DOTALL)
    except (re.error, TypeError) as e:
        raise ConfigError(
            f"format reward: pattern {pattern!r} is not a regular expression: {e}"
        ) from None

    def reward(record: Mapping[str, Any], completion: str) -> float:
        return 1.0 if regex.fullmatch(completion) else 0.0

    return reward


def length_reward(target: float, scale: float) -> RewardFn:
    """A tent around a target length: r = max(0, 1 - |L - target| / scale),

    L the completion's length in characters. 1.0 at the target, falling linearly to 0 at
    ``scale`` characters from it; never negative, so it composes with 0/1 rewards.
    """
    if not isinstance(target, int | float) or target < 0:
        raise ConfigError(f"length reward: target must be a number >= 0, got {target!r}")
    if not isinstance(scale, int | float) or not scale > 0:
        raise ConfigError(f"length reward: scale must be a number > 0, got {scale!r}")

    def reward(record: Mapping[str, Any], completion: str) -> float:
        return max(0.0, 1.0 - abs(len(completion) - target) / scale)

    return reward


def exact_match(field: str = "answer") -> RewardFn:
    """1.0 if the stripped completion equals ``str(record[field])`` (also stripped), else 0.0; a
    record without the field is an error (DataError via ``score_rule_rewards``)."""

    def reward(record: Mapping[str, Any], completion: str) -> float:
        if field not in record:
            raise ValueError(f"the record has no field {field!r} (fields: {sorted(record)})")
        return 1.0 if completion.strip() == str(record[field]).strip() else 0.0

    return reward


_WORD = re.compile(r"\w+")


def r3_reward() -> RewardFn:
    """R3 preference-free reward (METHODS.md section 4, catalog P2):

    r = L / 100 * relevance(x, y) * unique_trigrams(y),

    on the lower-cased words (``\\w+`` runs) of the prompt x (``record["prompt"]``, a string)
    and completion y. L = the number of words of y; relevance = the cosine between the
    bag-of-words count vectors of x and y (0 when either has no words); unique_trigrams = distinct
    word trigrams of y / all its word trigrams (1 when y has fewer than 3 words: nothing can
    repeat). The published relevance term is unverified; jaxalign picks this self-contained form
    (no embedding model) and pins it in tests. Rewards long, on-topic, non-repetitive answers.
    """

    def reward(record: Mapping[str, Any], completion: str) -> float:
        x = _WORD.findall(str(record["prompt"]).lower())
        y = _WORD.findall(completion.lower())
        cx, cy = collections.Counter(x), collections.Counter(y)
        dot = sum(n * cy[w] for w, n in cx.items())
        norms = math.sqrt(sum(n * n for n in cx.values()) * sum(n * n for n in cy.values()))
        relevance = dot / norms if norms else 0.0
        trigrams = list(zip(y, y[1:], y[2:], strict=False))
        unique = len(set(trigrams)) / len(trigrams) if trigrams else 1.0
        return len(y) / 100 * relevance * unique

    return reward


def _demo_judge_factory() -> RewardFn:
    return demo_judge


RULE_REWARDS: dict[str, Callable[..., RewardFn]] = {
    "demo_judge": _demo_judge_factory,
    "format": format_reward,
    "length": length_reward,
    "exact_match": exact_match,
    "r3": r3_reward,
}


# --------------------------------------------------------------------------------------------------
# Weights, composition, scoring.


@dataclasses.dataclass(frozen=True)
class LinearRamp:
    """A weight that moves linearly from ``start`` to ``end`` over ``steps`` steps, then stays:
    w(step) = start + (end - start) min(step, steps) / steps (``end`` from step 0 if steps = 0)."""

    start: float
    end: float
    steps: int

    def __call__(self, step: int) -> float:
        if self.steps == 0:
            return float(self.end)
        frac = min(max(step, 0), self.steps) / self.steps
        return float(self.start + (self.end - self.start) * frac)


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """A named reward with its weight: a constant, or a schedule ``weight(step) -> float``."""

    name: str
    fn: RewardFn
    weight: Weight = 1.0

    def weight_at(self, step: int) -> float:
        return float(self.weight(step) if callable(self.weight) else self.weight)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _weight(value: Any, where: str) -> Weight:
    """A config weight: a number, or ``{"start": a, "end": b, "steps": n}`` (a linear ramp)."""
    if _is_number(value):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: weight {value} is not finite")
        return float(value)
    if hasattr(value, "keys"):
        ramp = dict(value)
        if set(ramp) != {"start", "end", "steps"}:
            raise ConfigError(
                f'{where}: a weight schedule is {{"start": a, "end": b, "steps": n}}, got '
                f"keys {sorted(ramp)}"
            )
        steps = ramp["steps"]
        numbers = _is_number(ramp["start"]) and _is_number(ramp["end"])
        if not numbers or not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ConfigError(
                f"{where}: weight schedule {ramp}: start and end must be numbers, steps an int >= 0"
            )
        return LinearRamp(float(ramp["start"]), float(ramp["end"]), steps)
    raise ConfigError(
        f'{where}: weight {value!r} is neither a number nor {{"start", "end", "steps"}}'
    )


def _imported(name: str, where: str) -> Callable[..., RewardFn]:
    """A user's reward factory named ``"package.module:function"`` (the module importable from
    the working directory or PYTHONPATH): ``function(**params)`` returns the reward."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(
            f'{where}: reward "{name}": cannot import {module_name}: {type(e).__name__}: {e}'
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f'{where}: reward "{name}": {module_name} has no function {attr!r}')
    return factory


def _build(name: str, kwargs: Mapping[str, Any], where: str) -> RewardFn:
    if ":" in name:
        factory = _imported(name, where)
    elif name not in RULE_REWARDS:
        close = difflib.get_close_matches(name, RULE_REWARDS, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        known = ", ".join(sorted(RULE_REWARDS))
        raise ConfigError(
            f'{where}: unknown reward "{name}"{hint}; known rewards: {known}, or '
            '"package.module:factory" for your own'
        )
    else:
        factory = RULE_REWARDS[name]
    params = inspect.signature(factory).parameters
    for key in kwargs:
        if key not in params:
            close = difflib.get_close_matches(key, params, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            accepted = ", ".join(params) or "none"
            raise ConfigError(
                f'{where}: reward "{name}" has no parameter "{key}"{hint}; accepted: {accepted}'
            )
    missing = [
        p.name
        for p in params.values()
        if p.default is inspect.Parameter.empty and p.name not in kwargs
    ]
    if missing:
        raise ConfigError(f'{where}: reward "{name}" needs parameters {missing}')
    try:
        return factory(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def rewards_from_config(terms: Sequence[Sequence[Any]]) -> list[RewardSpec]:
    """Reward specs from config terms ``(name, weight)`` or ``(name, weight, {params})``.

    ``name`` a key of ``RULE_REWARDS`` or ``"package.module:factory"``, a function of yours
    that takes the params as keyword arguments and returns a reward; ``weight`` a number or a
    linear ramp ``{"start": a, "end": b, "steps": n}``; ``params`` the factory's keyword
    arguments (``format``: pattern; ``length``: target, scale; ``exact_match``: field). A name
    used twice is labelled ``name#k`` (k its position). Anything wrong raises ``ConfigError``
    naming the term.
    """
    if isinstance(terms, str | bytes) or not terms:
        raise ConfigError(
            f"rewards: expected a list of (name, weight[, params]) terms, got {terms!r}"
        )
    names = [term[0] if isinstance(term, tuple | list) and term else None for term in terms]
    specs = []
    for k, term in enumerate(terms):
        where = f"rewards[{k}]"
        if not isinstance(term, tuple | list) or not 2 <= len(term) <= 3:
            raise ConfigError(
                f"{where}: expected (name, weight) or (name, weight, params), got {term!r}"
            )
        name, weight, *rest = term
        if not isinstance(name, str):
            raise ConfigError(f"{where}: the reward name must be a string, got {name!r}")
        params = rest[0] if rest else {}
        if not hasattr(params, "keys"):
            raise ConfigError(f"{where}: params must be a dict, got {params!r}")
        label = name if names.count(name) == 1 else f"{name}#{k}"
        specs.append(RewardSpec(label, _build(name, dict(params), where), _weight(weight, where)))
    return specs


def _prompt_of(record) -> str:
    prompt = record.get("prompt") if hasattr(record, "get") else None
    if not isinstance(prompt, str):
        return ""
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    return f" (prompt {shown!r})"


def score_rule_rewards(
    specs: Sequence[RewardSpec],
    records: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    step: int,
) -> tuple[HostSeq, dict[str, HostSeq]]:
    """Score B completions: ``total = sum_k w_k(step) r_k`` and ``per_fn[name] = r_k``.

    ``per_fn`` holds each reward's raw (unweighted) values, for the ``rewards/<name>`` metrics.
    Host side; float32 NumPy arrays. A reward that raises, or returns something that is not a
    finite number, raises ``DataError``: ``reward "<name>" ... record <i>``.
    """
    if len(records) != len(completions):
        raise ValueError(
            f"jaxalign: score_rule_rewards: {len(records)} records for {len(completions)} "
            "completions (repeat each prompt's record once per completion)"
        )
    labels = [spec.name for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"jaxalign: score_rule_rewards: reward names repeat: {labels}")
    total = np.zeros(len(completions), np.float64)
    per_fn = {}
    for spec in specs:
        values = np.zeros(len(completions), np.float64)
        for i, (record, completion) in enumerate(zip(records, completions, strict=True)):
            try:
                value = spec.fn(record, completion)
            except Exception as e:
                raise DataError(
                    f'reward "{spec.name}" failed on record {i}{_prompt_of(record)}: '
                    f"{type(e).__name__}: {e}"
                ) from e
            if not _is_number(value) and not isinstance(value, np.number):
                raise DataError(
                    f'reward "{spec.name}" returned {value!r} for record {i}{_prompt_of(record)} '
                    "(expected a number)"
                )
            if not math.isfinite(value):
                raise DataError(
                    f'reward "{spec.name}" returned {value} for record {i}{_prompt_of(record)} '
                    "(expected a finite number)"
                )
            values[i] = value
        total += spec.weight_at(step) * values
        per_fn[spec.name] = values.astype(np.float32)
    return total.astype(np.float32), per_fn


# --------------------------------------------------------------------------------------------------
# Reward scaling (PPO-max), overlong penalty, InfAlign (pure JAX).


def init_reward_stats() -> RewardStats:
    """Empty running moments: ``{"count": 0, "mean": 0, "var": 0}``, float32 scalars."""
    zero = jnp.zeros((), jnp.float32)
    return {"count": zero, "mean": zero, "var": zero}


def update_reward_stats(state: RewardStats, rewards: SeqArray) -> RewardStats:
    """Merge a batch's moments into the running ones (Chan et al., 1979, parallel Welford):

    n = n_a + n_b,  d = mean_b - mean_a,  mean = mean_a + d n_b / n,
    var = (n_a var_a + n_b var_b + d^2 n_a n_b / n) / n,

    var the population variance (ddof=0) of every reward seen. The count is float32 (exact up to
    2^24 rewards; beyond, the merge weights are rounded by < 1e-7, harmless here).
    """
    r = rewards.astype(jnp.float32)
    n_b = jnp.asarray(r.shape[0], jnp.float32)
    mean_b = jnp.mean(r)
    var_b = jnp.mean(jnp.square(r - mean_b))
    n_a, mean_a, var_a = state["count"], state["mean"], state["var"]
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    var = (n_a * var_a + n_b * var_b + jnp.square(delta) * n_a * n_b / n) / n
    return {"count": n, "mean": mean, "var": var}


def scale_rewards(rewards: SeqArray, state: RewardStats, *, clip: float | None = None) -> SeqArray:
    """PPO-max reward scaling (Zheng et al., 2023, "Secrets of RLHF in LLMs, part I"):

    r' = clip(r / std_running, -clip, clip),

    dividing by the running std only: the mean is not subtracted (PPO-max scales, it does not
    centre; the advantage whitening centres later). Update the stats with the batch first, then
    scale it. While the stats have no spread (no rewards yet, or all equal) std is taken as 1.
    ``clip=None`` does not clip.
    """
    var = state["var"]
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 1.0)
    scaled = rewards.astype(jnp.float32) / std
    if clip is not None:
        scaled = jnp.clip(scaled, -clip, clip)
    return scaled


def overlong_penalty(lengths: SeqLike, *, max_len: int, buffer: int) -> SeqArray:
    """DAPO's soft overlong punishment (Yu et al., 2025), added to the reward:

    0                                  if L <= max_len - buffer
    (max_len - buffer - L) / buffer    if max_len - buffer < L <= max_len   (0 down to -1)
    -1                                 if L > max_len

    ``lengths`` the completion lengths in tokens; 0 <= buffer <= max_len (buffer 0: a hard -1
    beyond max_len).
    """
    if not 0 <= buffer <= max_len:
        raise ValueError(f"jaxalign: overlong_penalty needs 0 <= buffer <= max_len, got {buffer}")
    length = jnp.asarray(lengths, jnp.float32)
    start = max_len - buffer
    ramp = (start - length) / max(buffer, 1)
    return jnp.where(length <= start, 0.0, jnp.where(length <= max_len, ramp, -1.0))


def calibrate(rewards: SeqArray, ref_rewards: Float[Array, "B M"]) -> SeqArray:
    """InfAlign calibration (Balashankar et al., 2024): C = fraction of the M reference-policy
    samples for the same prompt whose reward is <= r (ties count as below), in [0, 1]."""
    below = ref_rewards <= rewards[:, None]
    return jnp.mean(below.astype(jnp.float32), axis=-1)


def infalign_transform(calibrated: SeqArray, *, t: float, mode: str = "best") -> SeqArray:
    """InfAlign transform of a calibrated reward: exp(t C) for best-of-N decoding (``"best"``),
    exp(-t C) for worst-of-N (``"worst"``); t > 0."""
    if mode not in ("best", "worst"):
        raise ValueError(f"jaxalign: infalign_transform: mode={mode!r}; expected 'best' or 'worst'")
    sign = 1.0 if mode == "best" else -1.0
    return jnp.exp(sign * t * calibrated.astype(jnp.float32))


__all__ = [
    "RULE_REWARDS",
    "LinearRamp",
    "RewardSpec",
    "calibrate",
    "demo_judge",
    "exact_match",
    "format_reward",
    "infalign_transform",
    "init_reward_stats",
    "length_reward",
    "lsc_combine",
    "lsc_transform",
    "overlong_penalty",
    "r3_reward",
    "rewards_from_config",
    "scale_rewards",
    "score_rule_rewards",
    "update_reward_stats",
]


# --------------------------------------------------------------------------------------------------
# Reward-model scoring.


@functools.partial(jax.jit, static_argnums=0)
def _reward_model_scores(model_config, params, rows):
    hidden = models.forward(
        model_config,
        heads.decoder_params(params),
        rows["tokens"],
        rows["positions"],
        rows["segment_ids"],
    )
    T = rows["segment_ids"].shape[1]
    last = T - 1 - jnp.argmax(rows["segment_ids"][:, ::-1] > 0, axis=1)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return heads.apply_head(params[heads.REWARD_HEAD], h)


def check_direction(params, direction) -> None:
    """A direction fits the reward model: k numbers for a k-output head, none for one output;
    ConfigError otherwise."""
    k = heads.head_outputs(params[heads.REWARD_HEAD])
    if direction is None and k != 1:
        raise ConfigError(
            f"the reward model has {k} objectives: rl.reward_direction must give {k} numbers"
        )
    if direction is not None and len(direction) != k:
        raise ConfigError(
            f"rl.reward_direction {tuple(direction)} has {len(direction)} numbers; the reward "
            f"model has {k} objectives"
        )


def reward_model_scores(model_config, params, rows, direction=None) -> HostSeq:
    """A reward model's score of each rollout row (`jaxalign.rl.rollout.rollout_rows`): its head
    on the hidden state of the row's last real input, whose target is the completion's last token
    (the EOS for a completion that stopped), as the reward trainer scores a sequence. float32
    [R], on the host.

    A multi-objective model (k outputs, trainer reward_multi) needs the user's `direction` v
    (unit length, `jaxalign.losses.unit_direction`) and scores r_v = v . r (Wang et al., 2024,
    DPA); a one-output model takes none. Anything else is a ConfigError."""
    check_direction(params, direction)
    arrays = {k: rows[k] for k in ("tokens", "positions", "segment_ids")}
    r = np.asarray(_reward_model_scores(model_config, params, arrays), np.float64)
    scores = r[:, 0] if direction is None else r @ np.asarray(direction, np.float64)
    return scores.astype(np.float32)
