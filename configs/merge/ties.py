"""TIES-merging on the demo runs (`make demo`): the DPO run's task vector over the SFT base,
trimmed to its largest `density` fraction per tensor, sign-elected, disjoint mean, times lam.
More fine-tuned runs of the same base go into `models` with their own weight and density.

    jaxalign merge --config configs/merge/ties.py --out runs/demo/merged-ties
    jaxalign merge --config configs/merge/ties.py:density=0.2 --out DIR --config.lam=1.2
"""

from jaxalign.config import parse_arg
from jaxalign.merge.driver import merge_config


def get_config(arg=None):
    arg = parse_arg(arg, density=0.5)
    c = merge_config()
    c.method = "ties"
    c.base = "checkpoint:runs/demo/sft"
    c.models = ({"model": "checkpoint:runs/demo/dpo", "weight": 1.0, "density": arg.density},)
    c.lam = 1.0
    c.lock()
    return c
