"""Task arithmetic on the demo runs (`make demo`): the DPO run's task vector over its SFT base,
scaled: theta_sft + lam * w (theta_dpo - theta_sft); lam > 1 extrapolates.

    jaxalign merge --config configs/merge/task_arithmetic.py:lam=1.5 --out runs/demo/merged-ta
"""

from jaxalign.config import parse_arg
from jaxalign.merge.driver import merge_config


def get_config(arg=None):
    arg = parse_arg(arg, lam=1.0)
    c = merge_config()
    c.method = "task_arithmetic"
    c.base = "checkpoint:runs/demo/sft"
    c.models = ({"model": "checkpoint:runs/demo/dpo", "weight": 1.0},)
    c.lam = arg.lam
    c.lock()
    return c
