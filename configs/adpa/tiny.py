"""ADPA (DPO + the teacher's token-level advantage), tiny student, the demo pairs, CPU.

The teacher and its reference here are random-init presets (weights from seed + 1 and seed + 2),
so the run only exercises the objective; for a real teacher, align one with DPO from its SFT run
and give both:

    jaxalign train --config configs/adpa/tiny.py:smoke=True --workdir runs/adpa-smoke
    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/dpo/tiny.py --workdir runs/dpo-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
    jaxalign train --config configs/adpa/tiny.py --workdir runs/adpa-tiny \\
        --config.distill.teacher=checkpoint:runs/dpo-tiny \\
        --config.distill.teacher_ref=checkpoint:runs/sft-tiny
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=200, smoke=False)
    c = base_config()
    c.trainer = "adpa"
    c.model.preset = "tiny-64"
    c.distill.teacher = "preset:tiny-64"
    c.distill.teacher_ref = "preset:tiny-64"
    c.distill.dpo_beta = 0.1
    c.distill.alpha = 1.0
    c.data.train = "data/demo/pairs_train.jsonl"
    c.data.eval = "data/demo/pairs_eval.jsonl"
    c.data.batch_size = 8 if arg.smoke else 32
    c.data.max_len = 48
    c.data.max_prompt_len = 32
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 0 if arg.smoke else 10
    c.steps = 3 if arg.smoke else arg.steps
    c.log_every = 1 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 100
    c.eval_batches = 1 if arg.smoke else 0
    c.checkpoint.every = 3 if arg.smoke else 100
    c.lock()
    return c
