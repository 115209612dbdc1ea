"""Restore-alignment on the demo runs (`make demo`): the DPO run (the fine-tuned model) with a
chosen set of tensors reset to the SFT run's values (here the SFT run stands for the aligned
model). By default the 4 tensors that moved most, relative change |x - b| / |b|; or by name.

    jaxalign merge --config configs/merge/restore.py --out runs/demo/restored
    jaxalign merge --config configs/merge/restore.py:top_k=0,pattern=self_attn --out DIR
    jaxalign merge --config configs/merge/restore.py:top_k=0,fraction=0.25 --out DIR
"""

from jaxalign.config import parse_arg
from jaxalign.merge.driver import merge_config


def get_config(arg=None):
    arg = parse_arg(arg, top_k=4, fraction=0.0, pattern="")
    c = merge_config()
    c.method = "restore"
    c.base = "checkpoint:runs/demo/sft"
    c.models = ({"model": "checkpoint:runs/demo/dpo"},)
    c.restore.pattern = arg.pattern
    c.restore.top_k = arg.top_k
    c.restore.fraction = arg.fraction
    c.lock()
    return c
