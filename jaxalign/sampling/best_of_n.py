"""Best-of-N / worst-of-N: sample N completions per prompt, score each with a reward function, keep
the highest (lowest) scoring one.

A reward is a plain callable ``reward(prompt_record, completion_text) -> float``: the record is
the prompt's raw JSONL record (so it can read reference fields such as "answer") and the text is
the detokenised completion (cut at a stop string). Built-in rewards are in `REWARD_FUNCTIONS`.

A trained reward model scores the tokens instead (`RewardModel`, `reward_model`): its head on
the last completion token of prompt + completion, as the reward trainer scores a sequence; a
multi-objective one (trainer reward_multi, k outputs) along the user's direction v, r_v = v . r
(Wang et al., 2024, "Arithmetic Control of LLMs for Diverse User Preferences: Directional
Preference Alignment with Multi-Objective Rewards"), v normalised to unit length.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array

from jaxalign import models as M
from jaxalign.data.demo_task import judge
from jaxalign.errors import ConfigError, DataError
from jaxalign.losses.reward import unit_direction
from jaxalign.models import heads
from jaxalign.rl.rewards import reward_model_scores
from jaxalign.rl.rollout import rollout_rows
from jaxalign.sampling.engine import generate
from jaxalign.sampling.options import SamplingOptions
from jaxalign.sampling.result import GenerateResult
from jaxalign.sharding import ShardingRules

Reward = Callable[[dict, str], float]


def demo_judge(record: dict, completion: str) -> float:
    """The demo task's judge (`jaxalign.data.demo_task.judge`): 1.0 when the completion is the
    right answer to ``record["prompt"]``, else 0.0."""
    return judge(record["prompt"], completion)


REWARD_FUNCTIONS: dict[str, Reward] = {"demo_judge": demo_judge}


def get_reward(name: str) -> Reward:
    """A built-in reward by name; `ConfigError` listing the known ones otherwise."""
    if name not in REWARD_FUNCTIONS:
        raise ConfigError(f"unknown reward {name!r}; known rewards: {sorted(REWARD_FUNCTIONS)}")
    return REWARD_FUNCTIONS[name]


def score_completions(
    reward: Reward,
    records: Sequence[dict | None],
    result: GenerateResult,
    *,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """``reward(records[prompt_index[r]], text[r])`` for every row r, float64 ``[R]``; NaN for
    rows of empty batch slots (record None). A reward that raises or returns a non-finite or
    non-numeric value raises `DataError` naming the reward and the record (``names[i]`` or
    "prompt i")."""
    reward_name = getattr(reward, "__name__", repr(reward))
    scores = np.full(result.tokens.shape[0], np.nan)
    for r, i in enumerate(result.prompt_index.tolist()):
        if records[i] is None:
            continue
        where = names[i] if names is not None else f"prompt {i}"
        try:
            value = reward(records[i], result.text[r])
        except Exception as e:
            raise DataError(f"reward {reward_name} failed on {where}: {e!r}") from e
        if not isinstance(value, int | float | np.number) or not math.isfinite(value):
            raise DataError(
                f"reward {reward_name} returned {value!r} for {where} (expected a finite number)"
            )
        scores[r] = float(value)
    return scores


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A trained reward model (params with "reward_head", `jaxalign.train.reward.
    load_reward_model`) and the unit direction v it scores along (None for a one-output head)."""

    model_config: M.ModelConfig
    params: M.Params
    direction: tuple[float, ...] | None


def reward_model(
    model_config: M.ModelConfig, params: M.Params, direction=None, *, name: str = "reward model"
) -> RewardModel:
    """The reward model with its direction v / |v| checked against its head: k numbers for k
    outputs (k > 1), none for one output; `ConfigError` naming ``name`` otherwise."""
    k = heads.head_outputs(params[heads.REWARD_HEAD])
    if direction is None:
        if k != 1:
            raise ConfigError(f"{name} has {k} objectives: give a direction of {k} numbers")
        return RewardModel(model_config, params, None)
    try:
        v = unit_direction(direction)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if len(v) != k:
        raise ConfigError(
            f"direction {tuple(direction)} has {len(v)} numbers; {name} has {k} objectives"
        )
    return RewardModel(model_config, params, v)


def reward_model_rewards(
    model: RewardModel, prompts: dict, result: GenerateResult, pad_id: int
) -> np.ndarray:
    """r_v(x, y) (r(x, y) for one output) of every row of ``result``, float64 [R]; NaN for rows
    of empty batch slots."""
    rows = rollout_rows(prompts, result, pad_id)
    scores = reward_model_scores(model.model_config, model.params, rows, model.direction)
    return np.where(rows["example_mask"] > 0, scores.astype(np.float64), np.nan)


@dataclasses.dataclass(frozen=True)
class BestOfN:
    """The kept completion of each prompt: ``result`` has one row per prompt (B rows,
    ``prompt_index`` = 0..B-1), ``sample`` [B] which of its N samples it was, ``score`` [B] its
    reward, ``scores`` [B, N] the rewards of all samples (NaN for empty batch slots)."""

    result: GenerateResult
    sample: np.ndarray
    score: np.ndarray
    scores: np.ndarray


def best_of_n(
    model_config: M.ModelConfig,
    params: M.Params,
    prompts: dict,
    *,
    rng: Array,
    options: SamplingOptions,
    reward: Reward | RewardModel,
    tokenizer,
    worst: bool = False,
    names: Sequence[str] | None = None,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> BestOfN:
    """Samples N = ``options.n`` completions per prompt and keeps the one with the highest reward
    (``worst=True``: the lowest; ties: the first sample). ``reward``: a `Reward` function, for
    which ``prompts`` must carry "records" (the raw prompt records, as `make_prompt_pipeline`
    gives them), or a `RewardModel` (`reward_model`), which scores the tokens."""
    if not isinstance(reward, RewardModel) and "records" not in prompts:
        raise ConfigError('best_of_n needs prompts["records"] (the raw records the reward reads)')
    result = generate(
        model_config,
        params,
        prompts,
        rng=rng,
        options=options,
        tokenizer=tokenizer,
        mesh=mesh,
        rules=rules,
    )
    if isinstance(reward, RewardModel):
        scores = reward_model_rewards(reward, prompts, result, options.pad_id)
    else:
        scores = score_completions(reward, prompts["records"], result, names=names)
    scores = scores.reshape(-1, options.n)
    ranked = np.where(np.isnan(scores), np.inf if worst else -np.inf, scores)
    sample = (np.argmin(ranked, axis=1) if worst else np.argmax(ranked, axis=1)).astype(np.int32)
    rows = np.arange(scores.shape[0]) * options.n + sample
    kept = GenerateResult(
        **{
            f.name: getattr(result, f.name)[rows]
            for f in dataclasses.fields(GenerateResult)
            if f.name != "prompt_index"
        },
        prompt_index=np.arange(scores.shape[0], dtype=np.int32),
    )
    return BestOfN(
        result=kept,
        sample=sample,
        score=scores[np.arange(scores.shape[0]), sample],
        scores=scores,
    )
