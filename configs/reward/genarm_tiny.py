"""Autoregressive reward model (GenARM, Xu et al. 2024) of the tiny model on the bundled
arithmetic pairs, CPU: a causal LM whose reward is its own sequence log-likelihood
r(x, y) = sum_t log pi_r(y_t | x, y_<t), trained with -logsig(beta_r (r(y_w) - r(y_l)))
(`jaxalign.losses.genarm_bt`, paired trainer, no reference model). The run's checkpoint then
guides a base model at decoding time (configs/generate/genarm.py: models.arms).

    jaxalign train --config configs/reward/genarm_tiny.py --workdir runs/genarm-rm-tiny
    jaxalign train --config configs/reward/genarm_tiny.py:smoke=True --workdir /tmp/genarm-smoke
    jaxalign generate --config configs/generate/genarm.py --prompts data/demo/prompts_eval.jsonl \\
        --out /tmp/genarm.jsonl --config.models.base=checkpoint:runs/sft-tiny \\
        --config.models.arms="('checkpoint:runs/genarm-rm-tiny',)"
"""

from ml_collections import ConfigDict

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=300, smoke=False)
    c = base_config()
    c.trainer = "paired"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/pairs_train.jsonl"
    c.data.eval = "data/demo/pairs_eval.jsonl"
    c.data.batch_size = 16
    c.data.max_len = 48
    c.data.max_prompt_len = 32
    c.loss = ConfigDict({"name": "genarm_bt", "beta": 1.0})
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 10
    c.steps = 3 if arg.smoke else arg.steps
    c.log_every = 1 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 100
    c.eval_batches = 2 if arg.smoke else 0
    c.checkpoint.every = 3 if arg.smoke else 100
    c.lock()
    return c
