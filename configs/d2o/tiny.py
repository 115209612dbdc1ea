"""D2O (Duan et al. 2024) of the tiny model on the bundled arithmetic task, CPU, from the SFT run:
-logsig((beta / K) sum_i s(y_i) - alpha s(y_l)) over K self-generated samples y_i and the human
negative y_l (`jaxalign.losses.d2o`, paired trainer on negatives records
{prompt, rejected, samples: [K]}). The samples come from the SFT model itself: `jaxalign
generate --samples_field` adds K completions to each pair record (its "chosen" is ignored).
Records whose sample is empty (the model ended at once) are skipped and counted.

    jaxalign generate --model checkpoint:runs/sft-tiny --prompts data/demo/pairs_train.jsonl \\
        --out runs/d2o-tiny/negatives.jsonl --n 2 --samples_field samples --max_new_tokens 8
    jaxalign train --config configs/d2o/tiny.py --workdir runs/d2o-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=300, smoke=False)
    c = base_config()
    c.trainer = "paired"
    c.model.preset = "tiny-64"
    c.data.train = "runs/d2o-tiny/negatives.jsonl"
    c.data.batch_size = 16
    c.data.max_len = 48
    c.data.max_prompt_len = 32
    c.data.num_samples = 2
    c.data.skip_bad_records = True
    c.loss.name = "d2o"
    c.loss.beta = 0.1
    del c.loss["label_smoothing"]
    c.loss.alpha = 0.1
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 10
    c.steps = 3 if arg.smoke else arg.steps
    c.log_every = 1 if arg.smoke else 10
    c.eval_every = 0
    c.eval_batches = 0
    c.checkpoint.every = 3 if arg.smoke else 100
    c.lock()
    return c
