"""Training: the trainer families, pure steps, the shared run plumbing and one loop per kind.

jaxalign.train.train(config, workdir)    # runs the loop of the config's family
"""

from jaxalign.train import families, offline, online
from jaxalign.train.offline import evaluate_checkpoint
from jaxalign.train.run import init_params, setup

LOOPS = {"offline": offline.train, "online": online.train}


def train(config, workdir, *, allow_config_change: bool = False) -> dict:
    """Run (or resume) the config's trainer family in `workdir`; returns the run's summary
    (`WORKDIR/summary.json`). A workdir holding a run of another config is refused unless
    `allow_config_change` (`jaxalign.train.workdir`)."""
    loop = LOOPS[families.get(config.trainer).loop]
    return loop(config, workdir, allow_config_change=allow_config_change)


__all__ = ["evaluate_checkpoint", "init_params", "setup", "train"]
