"""PPO (PPO-max: GAE, a value head on the policy, advantage whitening, clipped value loss, reward
scaling), tiny model, demo task, CPU, starting from the SFT run.

    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/ppo/tiny.py --workdir runs/ppo-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny

One update per rollout (on-policy, as GRPO's), λ = 1 (returns minus the value: the fresh value
head is a poor bootstrap), a small value weight (the value head shares the policy's trunk: at 0.5
its loss dominated the trunk's gradient and held-out accuracy fell), no KL to the reference; the
held-out prompts are sampled 32 times each at temperature 1 (`rl.eval_samples`).
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=200, smoke=False)
    c = base_config()
    c.trainer = "ppo"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/sft_train.jsonl"  # prompts (the completions are not read)
    c.data.eval = "data/demo/prompts_eval.jsonl"
    c.data.batch_size = 4 if arg.smoke else 32  # prompts per step
    c.data.max_prompt_len = 16
    c.rl.group_size = 8
    c.rl.max_new_tokens = 8
    c.rl.rewards = (("demo_judge", 1.0),)
    c.rl.kl_coef = 0.0
    c.rl.reward_scale = True
    c.rl.lam = 1.0
    c.rl.value_coef = 0.01
    c.rl.eval_samples = 4 if arg.smoke else 32
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.end_lr_ratio = 1.0
    c.steps = 3 if arg.smoke else arg.steps
    c.log_every = 1 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 50
    c.eval_batches = 1 if arg.smoke else 0
    c.checkpoint.every = 2 if arg.smoke else 100
    c.lock()
    return c
