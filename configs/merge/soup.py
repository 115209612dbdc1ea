"""Model soup (linear merge) of the demo's SFT and DPO runs (`make demo` leaves runs/demo/sft and
runs/demo/dpo): sum_i w_i theta_i / sum_i w_i.

    jaxalign merge --config configs/merge/soup.py --out runs/demo/merged-soup
"""

from jaxalign.merge.driver import merge_config


def get_config(arg=None):
    c = merge_config()
    c.method = "linear"
    c.models = (
        {"model": "checkpoint:runs/demo/sft", "weight": 0.5},
        {"model": "checkpoint:runs/demo/dpo", "weight": 0.5},
    )
    c.lock()
    return c
