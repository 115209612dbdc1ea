"""Config loading, overrides and key checking."""

import pathlib

import pytest

from jaxalign.config import (
    apply_overrides,
    base_config,
    check_known_keys,
    load_config,
    parse_arg,
)
from jaxalign.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Training configs; configs/generate (guided decoding) and configs/merge have their own schemas
# and are loaded by tests/sampling/test_cli_guided.py and tests/merge.
CONFIGS = sorted(
    p for p in (ROOT / "configs").rglob("*.py") if p.parent.name not in ("generate", "merge")
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_loads_locked_with_known_keys_and_a_command(path):
    config = load_config(str(path))
    check_known_keys(config)
    assert config.is_locked
    with pytest.raises(AttributeError):
        config.not_a_key = 1
    text = path.read_text()
    assert "jaxalign train --config " + str(path.relative_to(ROOT)) in text


def test_unknown_override_names_the_key_and_suggests():
    config = load_config(str(ROOT / "configs/dpo/tiny.py"))
    with pytest.raises(ConfigError, match='unknown key "optimizer.learning_rate".*"optimizer.lr"'):
        apply_overrides(config, ["optimizer.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match='unknown key "nope.lr"'):
        apply_overrides(config, ["nope.lr=1"])


def test_overrides_are_typed():
    config = load_config(str(ROOT / "configs/dpo/tiny.py"))
    apply_overrides(
        config, ["optimizer.lr=2", "data.pack=True", "model.init_from=hf:/x", "steps=7"]
    )
    assert config.optimizer.lr == 2.0 and isinstance(config.optimizer.lr, float)
    assert config.data.pack is True
    assert config.model.init_from == "hf:/x"
    assert config.steps == 7


def test_config_argument_parsing():
    config = load_config(str(ROOT / "configs/dpo/tiny.py") + ":steps=50,smoke=False")
    assert config.steps == 50
    with pytest.raises(ConfigError, match='"stepz" is unknown'):
        parse_arg("stepz=3", steps=1)


def test_typo_inside_a_config_file_is_caught():
    config = base_config()
    config.optimizer.learning_rate = 1e-3  # unlocked: the file could do this by mistake
    with pytest.raises(ConfigError, match='unknown key "optimizer.learning_rate"'):
        check_known_keys(config)
