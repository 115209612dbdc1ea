"""NPO unlearning with a retain set (NPO+GD) of the tiny model, CPU, starting from the SFT run: the
forget set is the demo's SFT eval split (its log-likelihood goes down: eval `logps/policy`), the
retain set its SFT train split, mixed in with weight 1 (`c.data.retain`; set it to "" and the
loss to {"name": "npo", "beta": 0.1} for plain NPO).

    jaxalign train --config configs/sft/tiny.py --workdir runs/sft-tiny
    jaxalign train --config configs/npo/tiny.py --workdir runs/npo-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
    jaxalign train --config configs/npo/tiny.py:smoke=True --workdir /tmp/npo-smoke
"""

from ml_collections import ConfigDict

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=100, smoke=False, retain_weight=1.0)
    c = base_config()
    c.trainer = "unpaired"
    c.model.preset = "tiny-64"
    c.data.train = "data/demo/sft_eval.jsonl"  # the forget set
    c.data.eval = "data/demo/sft_eval.jsonl"
    c.data.retain = "data/demo/sft_train.jsonl"
    c.data.batch_size = 16
    c.data.max_len = 48
    c.data.max_prompt_len = 32
    retain = {"policy_logps": "retain_logps", "lengths": "retain_lengths"}
    c.loss = ConfigDict(
        {
            "name": "mix",
            "terms": (("npo", 1.0, {"beta": 0.1}), ("sft", arg.retain_weight, {}, retain)),
        }
    )
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 5
    c.steps = 4 if arg.smoke else arg.steps
    c.log_every = 2 if arg.smoke else 10
    c.eval_every = 0 if arg.smoke else 50
    c.eval_batches = 2 if arg.smoke else 0
    c.checkpoint.every = 2 if arg.smoke else 100
    c.lock()
    return c
