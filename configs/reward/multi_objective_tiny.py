"""Multi-objective reward model (DPA, Wang et al. 2024) of the tiny model on the bundled rated
arithmetic answers, CPU: a 2-output head params["reward_head"] ([D, 2]) on the last response
token's hidden state, regressed (mean squared error over the objectives) on each record's
ratings [helpfulness, verbosity] (`data/demo/ratings_train.jsonl`, records
{"prompt", "response", "ratings": [2 numbers]}). Eval `rewards/mse_0`, `rewards/mse_1` are the
squared errors of the two objectives on the first batches of
the training file (the demo has no held-out ratings). Score with a direction v:
`jaxalign.train.reward.score(..., direction=v)` (r_v = v . r), or as the reward of the rft trainer
(`rl.reward_model`, `rl.reward_direction`, configs/dpa/rft_tiny.py).

    jaxalign train --config configs/reward/multi_objective_tiny.py --workdir runs/morm-tiny
    jaxalign train --config configs/reward/multi_objective_tiny.py:smoke=True --workdir /tmp/morm
"""

from ml_collections import ConfigDict

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=200, smoke=False)
    c = base_config()
    c.trainer = "reward_multi"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/ratings_train.jsonl"
    c.data.eval = "data/demo/ratings_train.jsonl"
    c.data.batch_size = 16
    c.data.max_len = 48
    c.data.max_prompt_len = 32
    c.reward.num_objectives = 2
    c.loss = ConfigDict({"name": "multi_objective_mse"})
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 10
    c.steps = 4 if arg.smoke else arg.steps
    c.log_every = 2 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 100
    c.eval_batches = 2 if arg.smoke else 8
    c.checkpoint.every = 2 if arg.smoke else 100
    c.lock()
    return c
