"""GenARM on the demo models (`make demo` leaves runs/demo/sft and runs/demo/dpo).

log p = log_softmax(log p_base + (1 / beta) sum_i w_i log p_arm_i), each autoregressive reward
model (ARM) a causal LM. Here the base is the SFT model and the one ARM is the DPO model (a
causal LM trained on the demo preferences); more ARMs with weights give multi-objective
guidance: --config.models.arms="('checkpoint:A', 'checkpoint:B')" --config.weights="(1.0, 0.5)".

    jaxalign generate --config configs/generate/genarm.py \\
        --prompts data/demo/prompts_eval.jsonl --out runs/demo/genarm.jsonl
    jaxalign generate --config configs/generate/genarm.py:beta=0.5 --prompts FILE --out FILE
"""

from jaxalign.config import parse_arg
from jaxalign.sampling.cli_generate import guided_config


def get_config(arg=None):
    arg = parse_arg(arg, beta=1.0)
    c = guided_config()
    c.method = "genarm"
    c.models.base = "checkpoint:runs/demo/sft"
    c.models.arms = ("checkpoint:runs/demo/dpo",)
    c.beta = arg.beta
    c.weights = (1.0,)
    c.sampling.max_new_tokens = 8
    c.sampling.temperature = 0.0
    c.lock()
    return c
