"""SPA (self-labelled preferences: the policy's implicit reward ranks its own two samples per
prompt, confident pairs train DPO), tiny model, demo task, CPU. It starts from a DPO run on the
seed pairs and keeps that run's reference, the SFT model: at the SFT model itself the implicit
reward is 0 and labels nothing.

    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/dpo/tiny.py --workdir runs/dpo-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
    jaxalign train --config configs/spa/tiny.py --workdir runs/spa-tiny \\
        --config.model.init_from=checkpoint:runs/dpo-tiny \\
        --config.reference.soup="('checkpoint:runs/sft-tiny',)"

Each step is a round: fresh samples from the current policy, labelled by it against the fixed
reference. The demo judge (`rl.rewards`) is only logged: `reward`, `spa/judge_agreement` (how
often the self-label agrees with the judge) and the held-out `reward/greedy`.
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=100, smoke=False)
    c = base_config()
    c.trainer = "spa"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/sft_train.jsonl"  # prompts (the completions are not read)
    c.data.eval = "data/demo/prompts_eval.jsonl"
    c.data.batch_size = 8 if arg.smoke else 16  # prompts per step
    c.data.max_prompt_len = 16
    c.rl.group_size = 2
    c.rl.max_new_tokens = 8
    c.rl.rewards = (("demo_judge", 1.0),)  # logged, not trained on
    c.rl.spa_min_confidence = 0.1
    c.rl.eval_samples = 4
    c.loss.name = "dpo"
    c.loss.beta = 0.1
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
