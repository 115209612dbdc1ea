"""CUT, ASFT, AFT and Re-Align end to end: each tiny config runs a few real steps through
`jaxalign.train.train` (finite loss, the method's own metric, a checkpoint), and bad keys or
records fail as one-line errors naming them."""

import pathlib

import numpy as np
import pytest

from jaxalign.config import apply_overrides, load_config
from jaxalign.errors import ConfigError
from jaxalign.train import setup, train

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(name, *overrides):
    config = load_config(f"{ROOT / 'configs' / name}:smoke=True")
    return apply_overrides(config, ["data.eval=", "data.batch_size=8", *overrides])


def _checkpoints(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_asft_smoke_is_reference_free(tmp_path):
    config = _config("asft/tiny.py")
    assert not setup(config, read_files=False).needs_ref
    result = train(config, tmp_path)
    metrics = result["train"]
    assert np.isfinite(metrics["loss"])
    assert {"asft/logodds_chosen", "asft/logodds_rejected", "nll/chosen"} <= set(metrics)
    assert _checkpoints(tmp_path)[-1] == 4


def test_asft_unknown_hyperparameter_is_a_config_error(tmp_path):
    config = _config("asft/tiny.py")
    with config.unlocked():
        config.loss.beta = 0.1
    with pytest.raises(ConfigError, match=r"loss 'asft'.*unknown hyperparameters \['beta'\]"):
        train(config, tmp_path)
