"""DARE on the demo runs (`make demo`): drop each entry of the DPO run's task vector over the SFT
base with probability 1 - density, rescale the rest by 1 / density, add to the base
(`:ties=True`: DARE-TIES, TIES' sign election and disjoint mean after the drop). Seeded.

    jaxalign merge --config configs/merge/dare.py --out runs/demo/merged-dare
    jaxalign merge --config configs/merge/dare.py:ties=True,density=0.3 --out DIR
"""

from jaxalign.config import parse_arg
from jaxalign.merge.driver import merge_config


def get_config(arg=None):
    arg = parse_arg(arg, density=0.5, ties=False)
    c = merge_config()
    c.method = "dare_ties" if arg.ties else "dare"
    c.base = "checkpoint:runs/demo/sft"
    c.models = ({"model": "checkpoint:runs/demo/dpo", "weight": 1.0, "density": arg.density},)
    c.seed = 0
    c.lock()
    return c
