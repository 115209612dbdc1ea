"""TSV-Merge of the demo's two fine-tunes of its SFT run (`make demo` leaves runs/demo/sft and,
both started from it, runs/demo/dpo and runs/demo/grpo): per weight matrix each task matrix
(theta_i - theta_sft) keeps its top rank_fraction share of singular triplets (default 1/2 with
two models), the kept singular vectors are orthogonalised across the two tasks, and alpha times
the sum is added to the SFT weights; norms get the mean task vector.

    jaxalign merge --config configs/merge/tsv.py --out runs/demo/merged-tsv
    jaxalign merge --config configs/merge/tsv.py:alpha=1.5,rank_fraction=0.25 --out DIR
"""

from jaxalign.config import parse_arg
from jaxalign.merge.driver import merge_config


def get_config(arg=None):
    arg = parse_arg(arg, alpha=1.0, rank_fraction=0.0)
    c = merge_config()
    c.method = "tsv"
    c.base = "checkpoint:runs/demo/sft"
    c.models = (
        {"model": "checkpoint:runs/demo/dpo", "weight": 1.0},
        {"model": "checkpoint:runs/demo/grpo", "weight": 1.0},
    )
    c.tsv.alpha = arg.alpha
    c.tsv.rank_fraction = arg.rank_fraction  # 0 = 1 / len(models)
    c.lock()
    return c
