"""GKD (on-policy distillation, generalised JSD to a teacher), tiny student, demo task, CPU.

The teacher here is a random-init preset (weights from seed + 1), so the run only shows the
student moving towards it; for a real teacher distil the demo's SFT run into a fresh student:

    jaxalign train --config configs/gkd/tiny.py --workdir runs/gkd-tiny
    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/gkd/tiny.py --workdir runs/gkd-from-sft \\
        --config.distill.teacher=checkpoint:runs/sft-tiny
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=200, smoke=False)
    c = base_config()
    c.trainer = "gkd"
    c.model.preset = "tiny-64"
    c.distill.teacher = "preset:tiny-qwen3"
    c.distill.beta = 0.5
    c.distill.lmbda = 0.5
    c.distill.temperature = 1.0
    c.data.train = "data/demo/sft_train.jsonl"  # {prompt, completion}
    c.data.eval = "data/demo/prompts_eval.jsonl"
    c.data.batch_size = 8 if arg.smoke else 16  # prompts per step (8: the tests fake 8 devices)
    c.data.max_prompt_len = 16
    c.rl.group_size = 1
    c.rl.max_new_tokens = 8
    c.rl.rewards = (("demo_judge", 1.0),)
    c.rl.kl_coef = 0.0
    c.optimizer.lr = 3e-3 if arg.smoke else 1e-3
    c.optimizer.warmup_steps = 0
    c.optimizer.end_lr_ratio = 1.0
    c.steps = 4 if arg.smoke else arg.steps
    c.log_every = 1 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 100
    c.eval_batches = 1 if arg.smoke else 0
    c.checkpoint.every = 2 if arg.smoke else 100
    c.lock()
    return c
