"""Re-Align (text form) of the tiny model on the bundled arithmetic pairs, CPU: DPO on (chosen,
rejected) plus the context-contrast term, DPO of the chosen answer under its own prompt against
the same answer under `contrast_prompt` (`jaxalign.losses.realign`), one batch of contrast pairs.

    jaxalign train --config configs/realign/tiny.py --workdir runs/realign-tiny
    jaxalign train --config configs/realign/tiny.py:smoke=True --workdir /tmp/realign-smoke
    jaxalign train --config configs/realign/tiny.py --workdir runs/realign-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
"""

from ml_collections import ConfigDict

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=300, smoke=False)
    c = base_config()
    c.trainer = "paired"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/contrast_train.jsonl"
    c.data.eval = "data/demo/contrast_train.jsonl"
    c.data.batch_size = 16
    c.data.max_len = 48
    c.data.max_prompt_len = 32
    c.loss = ConfigDict(
        {
            "name": "mix",
            "terms": (("dpo", 1.0, {"beta": 0.1}), ("realign", 1.0, {"beta": 0.1})),
        }
    )
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 10
    c.steps = 4 if arg.smoke else arg.steps
    c.log_every = 2 if arg.smoke else 20
    c.eval_every = 0 if arg.smoke else 100
    c.eval_batches = 2 if arg.smoke else 4
    c.checkpoint.every = 2 if arg.smoke else 100
    c.lock()
    return c
