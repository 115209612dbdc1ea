"""Named settings of the `rl` config section for the GRPO family's published variants.

A variant is only a set of `rl.*` values (nothing reads its name), applied by a config file, e.g.
`configs/grpo/tiny.py:variant='dapo'`:

| variant   | settings                                                                          |
|-----------|-----------------------------------------------------------------------------------|
| `grpo`    | group-normalised rewards, clip 0.2, k3 KL loss 0.04, mean of per-sequence token    |
|           | means (Shao et al., 2024)                                                         |
| `dr_grpo` | no std scaling, no length normalisation: token sums over a constant length        |
|           | (Liu et al., 2025)                                                                |
| `dapo`    | clip-higher 0.28, token-level mean, no KL, dynamic sampling (up to 3 extra rounds |
|           | replacing groups of equal rewards), soft overlong penalty over the last quarter   |
|           | of the new tokens (Yu et al., 2025)                                               |
| `gspo`    | sequence-level ratio with clip 3e-4 / 4e-4 (Zheng et al., 2025)                   |
| `grao`    | GRPO plus the pairwise term of `jaxalign.losses.grao` (pair_coef 1, beta 1; Wang  |
|           | et al., 2025; published form unverified, jaxalign's choice documented there)      |
"""

from __future__ import annotations

from ml_collections import ConfigDict

from jaxalign.errors import ConfigError

GRPO_VARIANTS: dict[str, dict] = {
    "grpo": {},
    "dr_grpo": {"scale_rewards": "none", "aggregation": "seq-mean-token-sum-norm"},
    "dapo": {
        "clip_high": 0.28,
        "aggregation": "token-mean",
        "kl_coef": 0.0,
        "dynamic_sampling": 3,
        "overlong_buffer": -4,  # a quarter of max_new_tokens (resolved by `apply_variant`)
    },
    "gspo": {
        "ratio": "sequence",
        "clip_low": 3e-4,
        "clip_high": 4e-4,
        "aggregation": "seq-mean-token-mean",
    },
    "grao": {"pair_coef": 1.0, "pair_beta": 1.0},
}


def apply_variant(config: ConfigDict, name: str) -> ConfigDict:
    """Set `config.rl` to the variant's values (after the config's own `rl` settings)."""
    if name not in GRPO_VARIANTS:
        raise ConfigError(f'variant "{name}" is unknown (known: {", ".join(GRPO_VARIANTS)})')
    for key, value in GRPO_VARIANTS[name].items():
        if key == "overlong_buffer":
            value = max(1, config.rl.max_new_tokens // -value)
        config.rl[key] = value
    return config
