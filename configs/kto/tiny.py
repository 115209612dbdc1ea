"""KTO (or unpaired BCO: `:loss='bco'`) of the tiny model on the bundled unpaired arithmetic data
({prompt, completion, label}), CPU, starting from the SFT run. KTO's KL baseline z0 comes from
mismatched (prompt_i, completion_j) sequences the pipeline adds to every batch; BCO's running
reward mean `delta` lives in the train state. The demo ships no unpaired eval split: pass one with
--config.data.eval=FILE.

    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/kto/tiny.py --workdir runs/kto-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
    jaxalign train --config configs/kto/tiny.py:loss='bco' --workdir runs/bco-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
    jaxalign train --config configs/kto/tiny.py:smoke=True --workdir /tmp/kto-smoke
"""

from ml_collections import ConfigDict

from jaxalign.config import base_config, parse_arg
from jaxalign.errors import ConfigError


def get_config(arg=None):
    arg = parse_arg(arg, steps=200, smoke=False, loss="kto")
    c = base_config()
    c.trainer = "unpaired"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/unpaired_train.jsonl"
    c.data.eval = ""
    c.data.batch_size = 16
    c.data.max_len = 48
    c.data.max_prompt_len = 32
    if arg.loss == "kto":
        c.loss = ConfigDict({"name": "kto", "beta": 0.1, "lam_d": 1.0, "lam_u": 1.0})
    elif arg.loss == "bco":
        c.loss = ConfigDict({"name": "bco", "beta": 0.1})
    else:
        raise ConfigError(f"configs/kto/tiny.py: loss={arg.loss!r}, expected 'kto' or 'bco'")
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 10
    c.steps = 4 if arg.smoke else arg.steps
    c.log_every = 2 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 100
    c.eval_batches = 2 if arg.smoke else 0
    c.checkpoint.every = 2 if arg.smoke else 100
    c.lock()
    return c
