"""SLERP from the demo's SFT run (t = 0) to its DPO run (t = 1) (`make demo`), tensor by tensor.

jaxalign merge --config configs/merge/slerp.py:t=0.3 --out runs/demo/merged-slerp
"""

from jaxalign.config import parse_arg
from jaxalign.merge.driver import merge_config


def get_config(arg=None):
    arg = parse_arg(arg, t=0.5)
    c = merge_config()
    c.method = "slerp"
    c.base = "checkpoint:runs/demo/sft"
    c.models = ({"model": "checkpoint:runs/demo/dpo"},)
    c.t = arg.t
    c.lock()
    return c
