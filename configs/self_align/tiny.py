"""Self-alignment (I-SHEEP style: the model answers, judges its own answers, keeps the good ones
and is fine-tuned on them, round after round), tiny model, demo task, CPU, starting from the SFT
run.

    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/self_align/tiny.py --workdir runs/self-align-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny

It is the rft family with the model as its own judge (`rl.rft_self_judge="confidence"`): each
step is a round of 4 samples per prompt from the current params, judged by their mean token
log-prob under those params, and the best-judged one is fine-tuned on when that reaches
`rl.rft_min_reward` (a log-prob: -0.5 keeps answers whose geometric-mean token probability is
>= 0.61). The other self-judge, majority vote over the group:
`--config.rl.rft_self_judge=consistency --config.rl.rft_min_reward=0.5 --config.rl.group_size=8`.
The demo judge (`rl.rewards`) is only logged: `reward`, `rft/judge_agreement` and the held-out
`reward/greedy`.
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=100, smoke=False)
    c = base_config()
    c.trainer = "rft"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/sft_train.jsonl"  # prompts (the completions are not read)
    c.data.eval = "data/demo/prompts_eval.jsonl"
    c.data.batch_size = 8 if arg.smoke else 16  # prompts per step
    c.data.max_prompt_len = 16
    c.rl.group_size = 4
    c.rl.max_new_tokens = 8
    c.rl.rewards = (("demo_judge", 1.0),)  # logged, not trained on
    c.rl.rft_self_judge = "confidence"
    c.rl.rft_min_reward = -0.5
    c.rl.eval_samples = 4
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
