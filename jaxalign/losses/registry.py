"""Losses by name, calling them with inputs by name, and loss mixes.

A loss is a pure function ``f(*inputs, *, **hyper) -> (loss [B], metrics)``. Its
positional-or-keyword parameters are *inputs* (arrays from the batch or the trainer: log-probs,
lengths, labels, margins, running state); its keyword-only parameters are *hyperparameters*
(from the config). Everything here is derived from the signature, so a new loss is one line in
``LOSSES``.

    loss, metrics = call("dpo", inputs, beta=0.1)  # inputs: dict of arrays; extra keys ignored
    fn = mix([("dpo", 0.8), ("bco_pair", 0.2), ("sft", 1.0)])  # MPO (Wang et al., 2024)
    loss, metrics = fn(inputs)  # loss [B] = sum_k w_k loss_k; its mean = sum_k w_k mean(loss_k)

Unpaired losses in a pair batch see the chosen side: a missing ``policy_logps`` / ``ref_logps``
/ ``lengths`` input is read from ``policy_chosen_logps`` / ``ref_chosen_logps`` /
``chosen_lengths`` (so "sft" in a mix is the NLL of the chosen response). A rename overrides it.
"""

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxtyping import Array

from jaxalign.losses import judgments, preference, reward, sft, unpaired

LossFn = Callable[..., tuple[Array, dict[str, Array]]]

LOSSES: dict[str, LossFn] = {
    "dpo": preference.dpo,
    "robust": preference.robust,
    "hinge": preference.hinge,
    "ipo": preference.ipo,
    "exo_pair": preference.exo_pair,
    "nca_pair": preference.nca_pair,
    "bco_pair": preference.bco_pair,
    "sppo_hard": preference.sppo_hard,
    "apo_zero": preference.apo_zero,
    "apo_down": preference.apo_down,
    "sigmoid_norm": preference.sigmoid_norm,
    "rpo": preference.rpo,
    "ld_dpo": preference.ld_dpo,
    "modpo": preference.modpo,
    "simpo": preference.simpo,
    "cpo": preference.cpo,
    "orpo": preference.orpo,
    "discopop": preference.discopop,
    "aot": preference.aot,
    "aot_unpaired": preference.aot_unpaired,
    "f_dpo": preference.f_dpo,
    "mm_dpo": preference.mm_dpo,
    "logo": preference.logo,
    "kto": unpaired.kto,
    "bco": unpaired.bco,
    "npo": unpaired.npo,
    "d2o": unpaired.d2o,
    "sft": sft.sft,
    "poft": sft.poft,
    "bradley_terry": reward.bradley_terry,
    "genarm_bt": reward.genarm_bt,
    "multi_objective_mse": reward.multi_objective_mse,
    "cut": judgments.cut,
    "asft": judgments.asft,
    "aft": judgments.aft,
    "realign": judgments.realign,
}

CHOSEN_SIDE: dict[str, str] = {
    "policy_logps": "policy_chosen_logps",
    "ref_logps": "ref_chosen_logps",
    "lengths": "chosen_lengths",
}

_INPUT_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def names() -> list[str]:
    """All registered loss names, sorted."""
    return sorted(LOSSES)


def get(name: str) -> LossFn:
    """The loss registered as ``name``; an unknown name raises a KeyError listing the known ones."""
    if name not in LOSSES:
        close = difflib.get_close_matches(name, LOSSES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        known = ", ".join(names())
        raise KeyError(f"jaxalign: unknown loss {name!r}{hint}; known losses: {known}")
    return LOSSES[name]


def _params(name: str) -> list[inspect.Parameter]:
    return list(inspect.signature(get(name)).parameters.values())


def inputs(name: str) -> tuple[str, ...]:
    """Every input the loss accepts (required and optional), in signature order."""
    return tuple(p.name for p in _params(name) if p.kind in _INPUT_KINDS)


def required_inputs(name: str) -> tuple[str, ...]:
    """The inputs the loss cannot run without (no default in the signature)."""
    return tuple(
        p.name
        for p in _params(name)
        if p.kind in _INPUT_KINDS and p.default is inspect.Parameter.empty
    )


def hyperparameters(name: str) -> dict[str, Any]:
    """Keyword-only hyperparameters and defaults (``inspect.Parameter.empty`` when required)."""
    return {p.name: p.default for p in _params(name) if p.kind is inspect.Parameter.KEYWORD_ONLY}


def needs_reference(name: str) -> bool:
    """True when a required input is a reference log-prob (named ``ref_*`` or ``*_ref_*``)."""
    return any(n.startswith("ref_") or "_ref_" in n for n in required_inputs(name))


@dataclasses.dataclass(frozen=True)
class Bound:
    """A loss with fixed hyperparameters; ``rename`` maps a loss input to the key it reads."""

    name: str
    hyper: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rename: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        accepted = hyperparameters(self.name)
        unknown = sorted(set(self.hyper) - set(accepted))
        if unknown:
            raise TypeError(
                f"jaxalign: loss {self.name!r} got unknown hyperparameters {unknown}; "
                f"accepted: {sorted(accepted)}"
            )
        missing = [
            k for k, v in accepted.items() if v is inspect.Parameter.empty and k not in self.hyper
        ]
        if missing:
            raise TypeError(f"jaxalign: loss {self.name!r} needs hyperparameters {missing}")
        bad = sorted(set(self.rename) - set(inputs(self.name)))
        if bad:
            raise TypeError(
                f"jaxalign: loss {self.name!r} has no inputs {bad} to rename; "
                f"its inputs: {list(inputs(self.name))}"
            )

    def source(self, param: str, batch: Mapping[str, Any]) -> str:
        """The batch key feeding ``param``: its rename, else its own name, else (when the batch
        lacks it) its chosen-side counterpart."""
        if param in self.rename:
            return self.rename[param]
        if param not in batch and param in CHOSEN_SIDE:
            return CHOSEN_SIDE[param]
        return param

    @property
    def required_inputs(self) -> tuple[str, ...]:
        """Required batch keys (before the chosen-side fallback, which depends on the batch)."""
        return tuple(self.rename.get(p, p) for p in required_inputs(self.name))

    @property
    def needs_reference(self) -> bool:
        return needs_reference(self.name)

    def __call__(self, batch: Mapping[str, Any]) -> tuple[Array, dict[str, Array]]:
        kwargs = {}
        for param in inputs(self.name):
            key = self.source(param, batch)
            if key in batch:
                kwargs[param] = batch[key]
        missing = [p for p in required_inputs(self.name) if p not in kwargs]
        if missing:
            raise KeyError(
                f"jaxalign: loss {self.name!r} needs inputs {missing}; got {sorted(batch)}"
            )
        return get(self.name)(**kwargs, **self.hyper)


def bind(name: str, **hyper: Any) -> Bound:
    """Fix a loss's hyperparameters; validated now, so a config typo fails before training."""
    return Bound(name, dict(hyper))


def call(name: str, batch: Mapping[str, Any], **hyper: Any) -> tuple[Array, dict[str, Array]]:
    """Run loss ``name`` on the inputs of ``batch`` it takes, by name (extra keys are ignored)."""
    return bind(name, **hyper)(batch)


MixSpec = (
    tuple[str, float]
    | tuple[str, float, Mapping[str, Any]]
    | tuple[str, float, Mapping[str, Any], Mapping[str, str]]
)


@dataclasses.dataclass(frozen=True)
class Mix:
    """Weighted sum of losses: loss_i = sum_k w_k loss_k,i, so the trainer's (masked) mean is
    sum_k w_k mean(loss_k). All terms see the same batch of B examples.

    Metrics of term k are prefixed ``"<label>/"``, label the loss name (``name#k`` when a name
    occurs twice); ``"<label>/loss"`` holds the term's unweighted per-example loss.
    """

    terms: tuple[Bound, ...]
    weights: tuple[float, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        count = {t.name: sum(u.name == t.name for u in self.terms) for t in self.terms}
        return tuple(
            t.name if count[t.name] == 1 else f"{t.name}#{k}" for k, t in enumerate(self.terms)
        )

    @property
    def required_inputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for t in self.terms for n in t.required_inputs))

    @property
    def needs_reference(self) -> bool:
        return any(t.needs_reference for t in self.terms)

    def __call__(self, batch: Mapping[str, Any]) -> tuple[Array, dict[str, Array]]:
        total = 0.0
        metrics: dict[str, Array] = {}
        for label, term, weight in zip(self.labels, self.terms, self.weights, strict=True):
            loss, term_metrics = term(batch)
            total = total + weight * loss
            metrics[f"{label}/loss"] = loss
            metrics |= {f"{label}/{k}": v for k, v in term_metrics.items()}
        return total, metrics


def mix(terms: Sequence[MixSpec]) -> Mix:
    """A loss mix from ``(name, weight)``, ``(name, weight, hyper)`` or ``(name, weight, hyper,
    rename)`` tuples, e.g. ``mix([("dpo", 0.8, {"beta": 0.2}), ("sft", 1.0)])``."""
    if not terms:
        raise ValueError("jaxalign: a loss mix needs at least one term")
    bound, weights = [], []
    for spec in terms:
        if not 2 <= len(spec) <= 4:
            raise ValueError(
                f"jaxalign: mix term {spec!r} is not (name, weight[, hyper[, rename]])"
            )
        name, weight, *rest = spec
        hyper = rest[0] if rest else {}
        rename = rest[1] if len(rest) > 1 else {}
        bound.append(Bound(name, dict(hyper), dict(rename)))
        weights.append(float(weight))
    return Mix(tuple(bound), tuple(weights))
