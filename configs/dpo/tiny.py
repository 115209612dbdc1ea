"""DPO of the tiny model on the bundled arithmetic pairs, CPU, starting from the SFT run.

    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/dpo/tiny.py --workdir runs/dpo-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
    jaxalign train --config configs/dpo/tiny.py:steps=50 --workdir runs/dpo-tiny \\
        --config.loss.beta=0.2
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=1000, smoke=False)
    c = base_config()
    c.trainer = "paired"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/pairs_train.jsonl"
    c.data.eval = "data/demo/pairs_eval.jsonl"
    c.data.batch_size = 32
    c.data.max_len = 48
    c.data.max_prompt_len = 32
    c.loss.name = "dpo"
    c.loss.beta = 0.1
    c.loss.label_smoothing = 0.0
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 10
    c.steps = 4 if arg.smoke else arg.steps
    c.log_every = 2 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 250
    c.eval_batches = 2 if arg.smoke else 0
    c.checkpoint.every = 2 if arg.smoke else 250
    c.lock()
    return c
