"""HC-RLHF (safety-constrained RLOO with a high-confidence safety test), tiny model, demo task,
CPU, starting from the SFT run.

    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/hc_rlhf/tiny.py --workdir runs/hc-rlhf-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny

The reward is the demo judge; the cost is 1 for a completion of 3 or more characters (a
`format` rule), and the constraint asks E[cost] <= rl.safety.tau = 0.25. After training, one
completion on each of the first 100 held-out prompts (data/demo/prompts_eval.jsonl) decides the
safety test: WORKDIR/safety.json, and "no solution" printed when it fails.
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=200, smoke=False)
    c = base_config()
    c.trainer = "hc_rlhf"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/sft_train.jsonl"  # prompts (the completions are not read)
    c.data.eval = "data/demo/prompts_eval.jsonl"
    c.data.batch_size = 4 if arg.smoke else 16  # prompts per step
    c.data.max_prompt_len = 16
    c.rl.group_size = 4 if arg.smoke else 8
    c.rl.max_new_tokens = 8
    c.rl.rewards = (("demo_judge", 1.0),)
    c.rl.costs = (("format", 1.0, {"pattern": ".{3,}"}),)  # 3 or more characters
    c.rl.kl_coef = 0.02
    c.rl.safety.tau = 0.25
    c.rl.safety.n = 4 if arg.smoke else 100
    c.rl.safety.lambda_lr = 0.2
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
