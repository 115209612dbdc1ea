"""Record-level data transforms (raw dict -> list of dicts), applied by sources before parsing."""

from __future__ import annotations

import functools
import math

from jaxalign.data.errors import RecordError

DEFAULT_SCORE_FORMAT = "Generate a response with a score of {score:g}."
# Directional preference alignment's system prompt (Wang et al. 2024), {weighted} the direction
# written as "helpfulness*0.6 + verbosity*0.8".
DPA_TEMPLATE = (
    "You are a helpful assistant. Your response should maximize weighted rating = {weighted}"
)


def reward_augment(
    record: dict,
    *,
    chosen_score_field: str = "score_chosen",
    rejected_score_field: str = "score_rejected",
    system_format: str = DEFAULT_SCORE_FORMAT,
) -> list[dict]:
    """Reward-augmented preference data: one scored pair -> two pairs conditioned on a target score.

    From (x, y_w, y_l, s_w, s_l) make
        (x | "score s_w", chosen=y_w, rejected=y_l)   -- y_w is the better answer for goal s_w,
        (x | "score s_l", chosen=y_l, rejected=y_w)   -- y_l is the better answer for goal s_l,
    so the policy learns the whole reward scale instead of only the winner (Zhang et al. 2024,
    "Reward-Augmented Data Enhances Direct Preference Alignment of LLMs"). The goal is given as a
    system message, ``system_format.format(score=s)``, placed after any ``system`` the record
    already has (separated by a blank line). Ties (s_w == s_l) give only the first pair. The score
    fields are removed.
    """
    scores = []
    for field in (chosen_score_field, rejected_score_field):
        v = record.get(field)
        if v is None:
            raise RecordError(field, "is missing", "a number (reward_augment needs both scores)")
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise RecordError(field, f"has type {type(v).__name__}", "a number")
        scores.append(float(v))
    s_w, s_l = scores
    base = {k: v for k, v in record.items() if k not in (chosen_score_field, rejected_score_field)}

    def conditioned(score: float, chosen, rejected) -> dict:
        goal = system_format.format(score=score)
        sys_ = base.get("system")
        return {
            **base,
            "system": goal if not sys_ else f"{sys_}\n\n{goal}",
            "chosen": chosen,
            "rejected": rejected,
        }

    out = [conditioned(s_w, record.get("chosen"), record.get("rejected"))]
    if s_w != s_l:
        out.append(conditioned(s_l, record.get("rejected"), record.get("chosen")))
    return out


def make_reward_augment(**kwargs) -> functools.partial:
    """`reward_augment` with its keyword options bound, for a pipeline's ``transforms`` list."""
    return functools.partial(reward_augment, **kwargs)


def direction_system(
    record: dict,
    *,
    objectives: tuple[str, ...],
    template: str = DPA_TEMPLATE,
    field: str = "direction",
) -> list[dict]:
    """Direction-conditioned data (DPA, Wang et al. 2024): write the record's direction into its
    system message.

    The record's ``field`` holds v, k = len(objectives) numbers, normalised here to unit length;
    the system message becomes ``template.format(weighted=...)``, weighted = "o_1*v_1 + ... +
    o_k*v_k" with the objective names and v's components to 4 significant digits, e.g. "You are
    a helpful assistant. Your response should maximize weighted rating = helpfulness*0.6 +
    verbosity*0.8", placed after any ``system`` the record already has (a blank line between).
    The direction field is removed. A missing, zero, non-numeric or wrong-length direction is a
    `RecordError` (a `DataError` naming file and line).
    """
    expected = f"a list of {len(objectives)} numbers, not all zero"
    v = record.get(field)
    if v is None:
        raise RecordError(field, "is missing", expected)
    if not isinstance(v, list) or len(v) != len(objectives):
        raise RecordError(field, f"is {v!r}", expected)
    if any(
        isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) for x in v
    ):
        raise RecordError(field, f"is {v!r}", expected)
    norm = math.sqrt(sum(x * x for x in v))
    if norm == 0.0:
        raise RecordError(field, "is zero", expected)
    weighted = " + ".join(f"{o}*{x / norm:.4g}" for o, x in zip(objectives, v, strict=True))
    goal = template.format(weighted=weighted)
    sys_ = record.get("system")
    out = {k: x for k, x in record.items() if k != field}
    return [out | {"system": goal if not sys_ else f"{sys_}\n\n{goal}"}]


def make_direction_system(**kwargs) -> functools.partial:
    """`direction_system` with its keyword options bound, for a pipeline's ``transforms`` list."""
    return functools.partial(direction_system, **kwargs)
