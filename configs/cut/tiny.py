"""CUT (unlikelihood from judgments) of the tiny model on judged demo answers, CPU: the answer's
tokens that its judgment makes likelier by more than `loss.threshold` get -w log(1 - p), the
others NLL (`jaxalign.losses.cut`; records `{prompt, response, judgment}`).

    jaxalign train --config configs/cut/tiny.py --workdir runs/cut-tiny
    jaxalign train --config configs/cut/tiny.py:smoke=True --workdir /tmp/cut-smoke
    jaxalign train --config configs/cut/tiny.py --workdir runs/cut-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny --config.loss.threshold=1.2
"""

from ml_collections import ConfigDict

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=200, smoke=False)
    c = base_config()
    c.trainer = "cut"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/judgments_train.jsonl"
    c.data.eval = "data/demo/judgments_train.jsonl"
    c.data.batch_size = 16
    c.data.max_len = 48
    c.data.max_prompt_len = 40
    c.loss = ConfigDict({"name": "cut", "threshold": 1.1, "unlikelihood_weight": 1.0})
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 10
    c.steps = 4 if arg.smoke else arg.steps
    c.log_every = 2 if arg.smoke else 20
    c.eval_every = 0 if arg.smoke else 100
    c.eval_batches = 2 if arg.smoke else 4
    c.checkpoint.every = 2 if arg.smoke else 100
    c.lock()
    return c
