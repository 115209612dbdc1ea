"""SimPO (reference-free: no reference weights, no reference forward) of the tiny model on the
bundled arithmetic pairs, CPU, starting from the SFT run. Any reference-free paired loss works the
same way (cpo, orpo: replace `c.loss`).

    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/dpo/tiny_simpo.py --workdir runs/simpo-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
    jaxalign train --config configs/dpo/tiny_simpo.py:smoke=True --workdir /tmp/simpo-smoke
"""

from ml_collections import ConfigDict

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=200, smoke=False)
    c = base_config()
    c.trainer = "paired"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/pairs_train.jsonl"
    c.data.eval = "data/demo/pairs_eval.jsonl"
    c.data.batch_size = 16
    c.data.max_len = 48
    c.data.max_prompt_len = 32
    # SimPO's own defaults: beta 2.0, gamma = 0.5 * beta.
    c.loss = ConfigDict({"name": "simpo", "beta": 2.0, "gamma_beta_ratio": 0.5})
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 10
    c.steps = 4 if arg.smoke else arg.steps
    c.log_every = 2 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 100
    c.eval_batches = 2 if arg.smoke else 0
    c.checkpoint.every = 2 if arg.smoke else 100
    c.lock()
    return c
