"""EFT / proxy tuning on the demo models (`make demo` leaves runs/demo/sft and runs/demo/dpo).

log p = log_softmax(log p_large_base + alpha (log p_small_tuned - log p_small_base)): the
tuning delta of a small model pair added to a large base. The demo has one model size, so the
"large" base is the SFT model and the small pair is (DPO, SFT): alpha = 1 is the DPO model,
alpha > 1 extrapolates its delta from SFT.

    jaxalign generate --config configs/generate/eft.py --prompts data/demo/prompts_eval.jsonl \\
        --out runs/demo/eft.jsonl
    jaxalign generate --config configs/generate/eft.py:alpha=2.0 --prompts FILE --out FILE \\
        --temperature 0.7 --config.models.large_base=hf:path/to/large-base
"""

from jaxalign.config import parse_arg
from jaxalign.sampling.cli_generate import guided_config


def get_config(arg=None):
    arg = parse_arg(arg, alpha=1.0)
    c = guided_config()
    c.method = "eft"
    c.models.large_base = "checkpoint:runs/demo/sft"
    c.models.small_tuned = "checkpoint:runs/demo/dpo"
    c.models.small_base = "checkpoint:runs/demo/sft"
    c.alpha = arg.alpha
    c.sampling.max_new_tokens = 8
    c.sampling.temperature = 0.0
    c.lock()
    return c
