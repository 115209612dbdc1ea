"""Sampling options: one frozen dataclass, validated on construction.

Only ``max_new_tokens``, ``n`` and the *number* of stop ids shape the compiled decode loop; every
other number (temperature, top-k, top-p, min-p, penalties, the stop ids themselves, the EOS and
pad ids) is a traced value inside it, so changing one never recompiles. Each option's identity
value (top_k=0, top_p=1, min_p=0, repetition_penalty=1, presence_penalty=0) switches it off.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

from jaxalign.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How `jaxalign.sampling.generate` picks each next token.

    Per step, on the next-token logits z of the (combined) policy:

    1. penalties: ``repetition_penalty`` r (CTRL, Keskar et al. 2019, with the Hugging Face
       sign rule) on every token already in the prompt or the completion: z -> z / r where
       z > 0, z * r otherwise; then ``presence_penalty`` a (OpenAI) on every token already in the
       completion: z -> z - a;
    2. ``temperature`` T: greedy argmax when T = 0, else z / T;
    3. ``top_k`` k: keep the k largest (ties with the k-th kept);
    4. ``top_p`` p (nucleus, Holtzman et al. 2020): on the top-k distribution, keep the smallest
       set of largest tokens whose probability sum reaches p (ties with the last kept);
    5. ``min_p`` m (Nguyen et al. 2024): keep tokens with p_i >= m * max_j p_j;
    6. sample from the renormalised kept tokens.

    A row ends at ``eos_id`` or any of ``stop_token_ids`` (that token is part of the completion)
    or after ``max_new_tokens``. ``stop_strings`` are searched on the host in the detokenised
    completion (needs a tokenizer); the completion is cut at the first one. ``pad_id`` fills
    ``tokens`` after the end of each row. ``n`` samples per prompt; ``seed`` is the CLI's seed
    (library calls pass ``rng`` explicitly).
    """

    max_new_tokens: int = 128
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    eos_id: int | None = None
    pad_id: int = 0
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        checks = {
            "max_new_tokens": (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, ">= 1"),
            "n": (_is_int(self.n) and self.n >= 1, ">= 1"),
            "temperature": (_is_real(self.temperature) and self.temperature >= 0, ">= 0"),
            "top_k": (_is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            "top_p": (_is_real(self.top_p) and 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
            "min_p": (_is_real(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1] (0 = off)"),
            "repetition_penalty": (
                _is_real(self.repetition_penalty) and self.repetition_penalty > 0,
                "> 0 (1 = off)",
            ),
            "presence_penalty": (_is_real(self.presence_penalty), "a finite number (0 = off)"),
            "stop_token_ids": (
                all(_is_int(i) and i >= 0 for i in self.stop_token_ids),
                "a tuple of token ids >= 0",
            ),
            "stop_strings": (
                all(isinstance(s, str) and s for s in self.stop_strings),
                "a tuple of non-empty strings",
            ),
            "eos_id": (
                self.eos_id is None or (_is_int(self.eos_id) and self.eos_id >= 0),
                "a token id >= 0 or None",
            ),
            "pad_id": (_is_int(self.pad_id) and self.pad_id >= 0, "a token id >= 0"),
            "seed": (_is_int(self.seed), "an integer"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(
                    f"sampling option {name}={getattr(self, name)!r}: expected {expected}"
                )

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every id that ends a row: ``eos_id`` (if set) followed by ``stop_token_ids``."""
        eos = () if self.eos_id is None else (self.eos_id,)
        return eos + self.stop_token_ids


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SamplingOptions))


def options_from_dict(d: Mapping[str, Any]) -> SamplingOptions:
    """`SamplingOptions` from a user mapping (config, JSON); an unknown name raises `ConfigError`
    naming it (with the closest known name). Lists become tuples."""
    unknown = [k for k in d if k not in OPTION_NAMES]
    if unknown:
        close = difflib.get_close_matches(unknown[0], OPTION_NAMES, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        known = ", ".join(OPTION_NAMES)
        raise ConfigError(f'unknown sampling option "{unknown[0]}"{hint}; known options: {known}')
    return SamplingOptions(**d)
