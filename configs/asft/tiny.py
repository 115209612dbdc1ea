"""ASFT (aligned SFT with absolute likelihood, reference-free) of the tiny model on the bundled
arithmetic pairs, CPU: NLL of the chosen answer plus each answer's own log-odds term
(`jaxalign.losses.asft`). From scratch by default; from an SFT run with `model.init_from`.

    jaxalign train --config configs/asft/tiny.py --workdir runs/asft-tiny
    jaxalign train --config configs/asft/tiny.py:smoke=True --workdir /tmp/asft-smoke
    jaxalign train --config configs/asft/tiny.py --workdir runs/asft-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny --config.loss.lam=0.3
"""

from ml_collections import ConfigDict

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=500, smoke=False)
    c = base_config()
    c.trainer = "paired"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/pairs_train.jsonl"
    c.data.eval = "data/demo/pairs_eval.jsonl"
    c.data.batch_size = 16
    c.data.max_len = 48
    c.data.max_prompt_len = 32
    c.loss = ConfigDict({"name": "asft", "lam": 0.1})
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 10
    c.steps = 4 if arg.smoke else arg.steps
    c.log_every = 2 if arg.smoke else 20
    c.eval_every = 0 if arg.smoke else 250
    c.eval_batches = 2 if arg.smoke else 0
    c.checkpoint.every = 2 if arg.smoke else 250
    c.lock()
    return c
