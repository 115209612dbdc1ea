"""Training: the trainer families, pure steps, the shared run plumbing and one loop per kind.

jaxalign.train.train(config, workdir)    # runs the loop of the config's family
"""

from jaxalign.train import families, offline
from jaxalign.train.offline import evaluate_checkpoint
from jaxalign.train.run import init_params, setup

LOOPS = {"offline": offline.train}


def train(config, workdir) -> dict:
    """Run (or resume) the config's trainer family in `workdir`; returns its last metrics."""
    return LOOPS[families.get(config.trainer).loop](config, workdir)


__all__ = ["evaluate_checkpoint", "init_params", "setup", "train"]
