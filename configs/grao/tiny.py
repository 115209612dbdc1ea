"""GRAO (jaxalign's form, `jaxalign.losses.grao`): GRPO's advantage-weighted clipped objective on
the G = 8 sampled answers of each prompt plus a pairwise term -logsig(beta (l_i - l_j)) over the
(better, worse) pairs of each group, tiny model, demo task, CPU, from the SFT run.

    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/grao/tiny.py --workdir runs/grao-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
    jaxalign train --config configs/grao/tiny.py:smoke=True --workdir /tmp/grao-smoke
"""

from jaxalign.config import base_config, parse_arg
from jaxalign.rl.variants import apply_variant


def get_config(arg=None):
    arg = parse_arg(arg, steps=120, smoke=False, pair_coef=1.0)
    c = base_config()
    c.trainer = "grpo"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/sft_train.jsonl"  # prompts (the completions are not read)
    c.data.eval = "data/demo/prompts_eval.jsonl"
    c.data.batch_size = 4 if arg.smoke else 32  # prompts per step
    c.data.max_prompt_len = 16
    c.rl.group_size = 8
    c.rl.max_new_tokens = 8
    c.rl.rewards = (("demo_judge", 1.0),)
    c.rl.kl_coef = 0.0
    c.rl.eval_samples = 4 if arg.smoke else 32
    apply_variant(c, "grao")
    c.rl.pair_coef = arg.pair_coef
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.end_lr_ratio = 1.0
    c.steps = 3 if arg.smoke else arg.steps
    c.log_every = 1 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 40
    c.eval_batches = 1 if arg.smoke else 0
    c.checkpoint.every = 2 if arg.smoke else 60
    c.lock()
    return c
