"""REINFORCE++ (discounted KL-shaped returns whitened over the batch), tiny model, demo task, CPU,
starting from the SFT run.

    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/reinforce_pp/tiny.py --workdir runs/reinforce_pp-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=200, smoke=False)
    c = base_config()
    c.trainer = "reinforce_pp"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/sft_train.jsonl"  # prompts (the completions are not read)
    c.data.eval = "data/demo/prompts_eval.jsonl"
    c.data.batch_size = 4 if arg.smoke else 16  # prompts per step
    c.data.max_prompt_len = 16
    c.rl.group_size = 8
    c.rl.max_new_tokens = 8
    c.rl.rewards = (("demo_judge", 1.0),)
    c.rl.kl_coef = 0.02
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.end_lr_ratio = 1.0
    c.steps = 3 if arg.smoke else arg.steps
    c.log_every = 1 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 100
    c.eval_batches = 1 if arg.smoke else 0
    c.checkpoint.every = 2 if arg.smoke else 100
    c.lock()
    return c
