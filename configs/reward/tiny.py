"""Bradley-Terry reward model of the tiny model on the bundled arithmetic pairs, CPU, starting from
the SFT run: a scalar head params["reward_head"] on the last response token's hidden state,
saved with the checkpoint. Eval `rewards/accuracy` is the held-out preference accuracy. Score
responses with `jaxalign.train.reward.load_reward_model` and `score`. Per-pair margins: records
with a "margin" number and --config.data.extra_fields="('margin',)".

    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/reward/tiny.py --workdir runs/rm-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
    jaxalign train --config configs/reward/tiny.py:smoke=True --workdir /tmp/rm-smoke
"""

from ml_collections import ConfigDict

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=200, smoke=False)
    c = base_config()
    c.trainer = "reward"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/pairs_train.jsonl"
    c.data.eval = "data/demo/pairs_eval.jsonl"
    c.data.batch_size = 16
    c.data.max_len = 48
    c.data.max_prompt_len = 32
    c.loss = ConfigDict({"name": "bradley_terry", "center_coef": 0.0})
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 10
    c.steps = 4 if arg.smoke else arg.steps
    c.log_every = 2 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 100
    c.eval_batches = 2 if arg.smoke else 0
    c.checkpoint.every = 2 if arg.smoke else 100
    c.lock()
    return c
