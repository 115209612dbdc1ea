"""Record-level data transforms (raw dict -> list of dicts), applied by sources before parsing."""

from __future__ import annotations

import functools

from jaxalign.data.errors import RecordError

DEFAULT_SCORE_FORMAT = "Generate a response with a score of {score:g}."


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
