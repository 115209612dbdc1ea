"""GRPO straight from the base model (no SFT stage, "RL-zero"), tiny model, demo task, CPU.

    jaxalign train --config configs/grpo/from_base_tiny.py --workdir runs/grpo-from-base

The base here is the random init of `seed` (`model.init_from` "" ; any pre-SFT checkpoint or hf:
model fits the same command with --config.model.init_from=...). A random model almost never
samples the exact answer, so the judge alone gives all-zero groups and zero advantages; as
DeepSeek-R1-Zero pairs accuracy with a format reward, a small format reward ("a number, then
EOS": pattern `\\d{1,3}`) gives the first signal, and the judge the rest. Held-out numbers are in
the README (Self-generated data): within the tiny budget the format is learnt, not arithmetic.
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=200, smoke=False)
    c = base_config()
    c.trainer = "grpo"
    c.model.preset = "tiny-64"
    c.model.init_from = ""  # the base: random init of `seed`
    c.data.train = "data/demo/sft_train.jsonl"  # prompts (the completions are not read)
    c.data.eval = "data/demo/prompts_eval.jsonl"
    c.data.batch_size = 4 if arg.smoke else 32  # prompts per step
    c.data.max_prompt_len = 16
    c.rl.group_size = 8
    c.rl.max_new_tokens = 4
    c.rl.temperature = 1.0
    c.rl.rewards = (("demo_judge", 1.0), ("format", 0.2, {"pattern": r"\d{1,3}"}))
    c.rl.kl_coef = 0.0
    c.rl.eval_samples = 4 if arg.smoke else 16
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 0
    c.optimizer.end_lr_ratio = 1.0
    c.steps = 3 if arg.smoke else arg.steps
    c.log_every = 1 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 100
    c.eval_batches = 1 if arg.smoke else 0
    c.checkpoint.every = 2 if arg.smoke else 100
    c.lock()
    return c
