"""MPO-style loss mix (Wang et al., 2024: sigmoid DPO 0.8 + BCO 0.2 + SFT 1.0) of the tiny model
on the bundled arithmetic pairs, CPU, starting from the SFT run. The bco_pair term's running
reward mean `delta` is carried in the train state (`state["loss_state"]`, checkpointed).

    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/dpo/tiny_mix.py --workdir runs/mix-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
    jaxalign train --config configs/dpo/tiny_mix.py:smoke=True --workdir /tmp/mix-smoke \\
        --config.loss.terms="(('dpo', 1.0, {'beta': 0.2}), ('sft', 0.5))"
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
    # (name, weight[, hyperparameters[, input renames]]); "sft" in a pair batch is the NLL of
    # the chosen response.
    c.loss = ConfigDict(
        {
            "name": "mix",
            "terms": (("dpo", 0.8, {"beta": 0.1}), ("bco_pair", 0.2, {"beta": 0.1}), ("sft", 1.0)),
        }
    )
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 10
    c.steps = 4 if arg.smoke else arg.steps
    c.log_every = 2 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 100
    c.eval_batches = 2 if arg.smoke else 0
    c.checkpoint.every = 2 if arg.smoke else 100
    c.lock()
    return c
