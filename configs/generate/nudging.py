"""Nudging on the demo models (`make demo` leaves runs/demo/sft and runs/demo/dpo).

The base model (SFT) decodes; at a step where its top-1 probability is below gamma the aligned
model (DPO) emits the next token (one token, not a word).

    jaxalign generate --config configs/generate/nudging.py \\
        --prompts data/demo/prompts_eval.jsonl --out runs/demo/nudging.jsonl
    jaxalign generate --config configs/generate/nudging.py:gamma=0.6 --prompts FILE --out FILE
"""

from jaxalign.config import parse_arg
from jaxalign.sampling.cli_generate import guided_config


def get_config(arg=None):
    arg = parse_arg(arg, gamma=0.4)
    c = guided_config()
    c.method = "nudging"
    c.models.base = "checkpoint:runs/demo/sft"
    c.models.aligned = "checkpoint:runs/demo/dpo"
    c.gamma = arg.gamma
    c.sampling.max_new_tokens = 8
    c.sampling.temperature = 0.0
    c.lock()
    return c
