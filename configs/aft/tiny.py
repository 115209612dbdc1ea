"""AFT constraint ranking (Wang et al., 2024) of the tiny model on the bundled arithmetic task, CPU:
per prompt P = 2 correct and N = 2 incorrect answer chains, log(1 + sum_{p,n} exp(s_n - s_p)) on
the mean token log-probs s plus a hinge keeping each incorrect chain at most `margin` nats per token
below the reference's (`jaxalign.losses.aft`, paired trainer on ranked records {prompt, correct:
[P], incorrect: [N]}; data/demo/aft_train.jsonl from `python tools/make_judgment_data.py`).

    jaxalign train --config configs/aft/tiny.py:smoke=True --workdir runs/aft-smoke
    jaxalign train --config configs/aft/tiny.py --workdir runs/aft-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
"""

from ml_collections import ConfigDict

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=300, smoke=False)
    c = base_config()
    c.trainer = "paired"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/aft_train.jsonl"
    c.data.batch_size = 8
    c.data.max_len = 32
    c.data.max_prompt_len = 16
    c.data.num_correct = 2
    c.data.num_incorrect = 2
    c.loss = ConfigDict({"name": "aft", "margin": 1.0, "boundary_weight": 1.0})
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 10
    c.steps = 3 if arg.smoke else arg.steps
    c.log_every = 1 if arg.smoke else 10
    c.eval_every = 0
    c.eval_batches = 0
    c.checkpoint.every = 3 if arg.smoke else 100
    c.lock()
    return c
