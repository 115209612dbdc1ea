"""Directional rejection sampling (DPA, Wang et al. 2024): the rft trainer keeps each prompt's
best of 8 samples under r_v = v . r, r the multi-objective reward model of
configs/reward/multi_objective_tiny.py and v the user's direction `rl.reward_direction`
(normalised), tiny model, demo prompts, CPU. The demo judge is logged (weight 0), not rewarded.

    jaxalign train --config configs/reward/multi_objective_tiny.py --workdir runs/morm-tiny
    jaxalign train --config configs/dpa/rft_tiny.py --workdir runs/dpa-rft-tiny
    jaxalign train --config configs/dpa/rft_tiny.py --workdir runs/dpa-rft-verbose \\
        --config.rl.reward_direction="(0.2, 1.0)"
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=200, smoke=False)
    c = base_config()
    c.trainer = "rft"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/sft_train.jsonl"  # prompts (the completions are not read)
    c.data.batch_size = 4 if arg.smoke else 16  # prompts per step
    c.data.max_prompt_len = 16
    c.rl.group_size = 8
    c.rl.max_new_tokens = 16
    c.rl.rewards = (("demo_judge", 0.0),)
    c.rl.reward_model = "runs/morm-tiny"
    c.rl.reward_direction = (1.0, 0.5)
    c.rl.rft_min_reward = -1e9  # keep every prompt's best under v . r
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.end_lr_ratio = 1.0
    c.steps = 3 if arg.smoke else arg.steps
    c.log_every = 1 if arg.smoke else 10
    c.eval_every = 0
    c.checkpoint.every = 2 if arg.smoke else 100
    c.lock()
    return c
