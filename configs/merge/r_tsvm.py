"""R-TSVM merge of the demo's two fine-tunes of its SFT run (`make demo` leaves runs/demo/sft
and, both started from it, runs/demo/dpo and runs/demo/grpo): per weight matrix each task matrix
(theta_i - theta_sft) has its entries above the outlier_quantile quantile of magnitudes clipped
to it, keeps the fewest top singular triplets holding the energy share of its squared singular
values (capped so the two tasks' ranks add up to at most min(m, n)), the kept singular vectors
are orthogonalised across the two tasks, and alpha times the sum is added to the SFT weights;
norms get the mean task vector.

    jaxalign merge --config configs/merge/r_tsvm.py --out runs/demo/merged-r-tsvm
    jaxalign merge --config configs/merge/r_tsvm.py:energy=0.5,outlier_quantile=0.95 --out DIR
"""

from jaxalign.config import parse_arg
from jaxalign.merge.driver import merge_config


def get_config(arg=None):
    arg = parse_arg(arg, alpha=1.0, outlier_quantile=0.99, energy=0.9)
    c = merge_config()
    c.method = "r_tsvm"
    c.base = "checkpoint:runs/demo/sft"
    c.models = (
        {"model": "checkpoint:runs/demo/dpo", "weight": 1.0},
        {"model": "checkpoint:runs/demo/grpo", "weight": 1.0},
    )
    c.r_tsvm.alpha = arg.alpha
    c.r_tsvm.outlier_quantile = arg.outlier_quantile
    c.r_tsvm.energy = arg.energy
    c.lock()
    return c
