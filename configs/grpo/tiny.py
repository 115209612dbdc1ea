"""GRPO of the tiny model on the demo task, rewarded by the demo judge, CPU: the demo's third
stage, starting from the SFT run.

    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/grpo/tiny.py --workdir runs/grpo-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
    jaxalign train --config configs/grpo/tiny.py:variant=dapo --workdir runs/dapo-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny     # or dr_grpo, gspo

Prompts come from the SFT file (its completions are not read); held-out prompts from
data/demo/prompts_eval.jsonl, answered greedily once and sampled 32 times at temperature 1
(`rl.eval_samples`; per-prompt scores in WORKDIR/eval/step_N.json). No KL term: on this task it
only slowed the gain (README, Online RL).
"""

from jaxalign.config import base_config, parse_arg
from jaxalign.rl.variants import apply_variant


def get_config(arg=None):
    arg = parse_arg(arg, steps=120, smoke=False, variant="grpo")
    c = base_config()
    c.trainer = "grpo"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/sft_train.jsonl"
    c.data.eval = "data/demo/prompts_eval.jsonl"
    c.data.batch_size = 4 if arg.smoke else 32  # prompts per step
    c.data.max_prompt_len = 16
    c.rl.group_size = 8
    c.rl.max_new_tokens = 8
    c.rl.temperature = 1.0
    c.rl.rewards = (("demo_judge", 1.0),)
    c.rl.kl_coef = 0.0
    c.rl.eval_samples = 4 if arg.smoke else 32
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.end_lr_ratio = 1.0
    apply_variant(c, arg.variant)
    c.steps = 3 if arg.smoke else arg.steps
    c.log_every = 1 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 40
    c.eval_batches = 1 if arg.smoke else 0
    c.checkpoint.every = 2 if arg.smoke else 60
    c.lock()
    return c
