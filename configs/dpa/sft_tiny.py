"""Direction-conditioned SFT (DPA, Wang et al. 2024) of the tiny model on the bundled directional
records `data/demo/directional_sft.jsonl` ({"prompt", "completion", "direction": [v1, v2]}), CPU.
Each record's direction is normalised and written into its system message,

    You are a helpful assistant. Your response should maximize weighted rating =
    helpfulness*0.96 + verbosity*0.279

(`data.direction_objectives`, `data.direction_template`; `jaxalign.data.direction_system`), so
the policy learns to follow a user's direction: terse answers for helpfulness-leaning ones,
verbose ones for verbosity-leaning ones.

    jaxalign train --config configs/dpa/sft_tiny.py --workdir runs/dpa-sft-tiny
    jaxalign train --config configs/dpa/sft_tiny.py:smoke=True --workdir /tmp/dpa-sft
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=1000, smoke=False)
    c = base_config()
    c.trainer = "sft"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/directional_sft.jsonl"
    c.data.direction_objectives = ("helpfulness", "verbosity")
    c.data.batch_size = 16
    c.data.max_len = 128  # the system message is ~80 tokens of the demo tokenizer
    c.data.max_prompt_len = 112
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 30
    c.steps = 4 if arg.smoke else arg.steps
    c.log_every = 2 if arg.smoke else 20
    c.eval_every = 0
    c.checkpoint.every = 2 if arg.smoke else 500
    c.lock()
    return c
