"""SFT of the tiny model from scratch on the bundled arithmetic task, CPU.

jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
jaxalign train --config configs/sft/tiny.py:smoke=True --workdir /tmp/sft-smoke
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=2000, smoke=False)
    c = base_config()
    c.trainer = "sft"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/sft_train.jsonl"
    c.data.eval = "data/demo/sft_eval.jsonl"
    c.data.batch_size = 32
    c.data.max_len = 48
    c.data.max_prompt_len = 32
    c.data.pack = True
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.01
    c.steps = 4 if arg.smoke else arg.steps
    c.log_every = 2 if arg.smoke else 20
    c.eval_every = 0 if arg.smoke else 500
    c.eval_batches = 2 if arg.smoke else 8
    c.checkpoint.every = 2 if arg.smoke else 500
    c.lock()
    return c
