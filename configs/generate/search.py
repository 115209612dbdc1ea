"""Search-time decoding (controlled decoding / Transfer Q* / DeAL) on the demo models: per step the
SFT policy's top-k tokens, each scored by log p + alpha V with V a reward model's head read at
the candidate (`jaxalign.sampling.search`); greedy takes the best score. `make demo` leaves
runs/demo/sft; the reward model trains from it:

    jaxalign train --config configs/reward/tiny.py --workdir runs/demo/rm \\
        --config.model.init_from=checkpoint:runs/demo/sft
    jaxalign generate --config configs/generate/search.py --prompts data/demo/prompts_eval.jsonl \\
        --out runs/demo/search.jsonl
    jaxalign generate --config configs/generate/search.py:alpha=2.0,k=8 --prompts FILE --out FILE \\
        --config.models.value=checkpoint:runs/ppo-tiny --config.head=value_head
"""

from jaxalign.config import parse_arg
from jaxalign.sampling.cli_generate import guided_config


def get_config(arg=None):
    arg = parse_arg(arg, alpha=1.0, k=4)
    c = guided_config()
    c.method = "search"
    c.models.policy = "checkpoint:runs/demo/sft"
    c.models.value = "checkpoint:runs/demo/rm"
    c.head = "reward_head"
    c.alpha = arg.alpha
    c.k = arg.k
    c.sampling.max_new_tokens = 8
    c.sampling.temperature = 0.0
    c.lock()
    return c
