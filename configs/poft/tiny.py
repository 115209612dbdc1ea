"""PoFT (Preference-Oriented SFT, Fan et al. 2024) of the tiny model from scratch on the bundled
SFT data, CPU: -logsig(score_theta - score_aligned), score = logp(y) / |y|
(`jaxalign.losses.poft`, unpaired trainer on SFT records). The aligned model is the trainer's
reference, `reference.soup` (default: the DPO run of the quick start, runs/dpo-tiny; any model of
the same architecture and tokenizer); cache its scores once with `jaxalign cache-ref`, then
train with no aligned weights in memory:

    jaxalign cache-ref --config configs/poft/tiny.py --out runs/poft-tiny/aligned_logps.jsonl
    jaxalign train --config configs/poft/tiny.py --workdir runs/poft-tiny \\
        --config.data.ref_logps=runs/poft-tiny/aligned_logps.jsonl
    jaxalign train --config configs/poft/tiny.py:smoke=True --workdir /tmp/poft-smoke \\
        --config.reference.soup="('checkpoint:runs/sft-tiny',)"
"""

from ml_collections import ConfigDict

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=500, smoke=False)
    c = base_config()
    c.trainer = "unpaired"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/sft_train.jsonl"
    c.data.eval = "data/demo/sft_eval.jsonl"
    c.data.batch_size = 16
    c.data.max_len = 48
    c.data.max_prompt_len = 32
    c.loss = ConfigDict({"name": "poft"})
    c.reference.soup = ("checkpoint:runs/dpo-tiny",)
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 30
    c.steps = 3 if arg.smoke else arg.steps
    c.log_every = 1 if arg.smoke else 20
    c.eval_every = 0 if arg.smoke else 250
    c.eval_batches = 2 if arg.smoke else 8
    c.checkpoint.every = 3 if arg.smoke else 250
    c.lock()
    return c
