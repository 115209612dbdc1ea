"""The family registry is the one place that knows trainer families by name."""

import ast
import pathlib

import jax
import pytest

from jaxalign import sharding
from jaxalign.config import apply_overrides, load_config
from jaxalign.data.layout import BatchSpec
from jaxalign.errors import ConfigError
from jaxalign.train import families, setup

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_dpo_is_an_alias_of_the_paired_family():
    assert families.get("dpo") is families.get("paired")
    config = load_config(f"{ROOT / 'configs/dpo/tiny.py'}:smoke=True")
    assert config.trainer == "paired"
    old_name = apply_overrides(config, ["trainer=dpo"])
    assert setup(old_name, read_files=False).family is families.FAMILIES["paired"]


def test_an_unknown_family_names_the_known_ones():
    with pytest.raises(ConfigError, match=r'trainer "pairs" is unknown \(did you mean "paired"'):
        families.get("pairs")


@pytest.mark.parametrize(
    "name, spec",
    [
        ("sft/tiny.py", BatchSpec("sft")),
        ("dpo/tiny.py", BatchSpec("pair")),
        ("kto/tiny.py", BatchSpec("unpaired", kl_sequences=True)),
        ("kto/tiny.py:loss='bco'", BatchSpec("unpaired")),
        ("npo/tiny.py", BatchSpec("sft", retain=True)),
        ("reward/tiny.py", BatchSpec("pair")),
    ],
)
def test_each_family_reads_the_batches_its_objective_declares(name, spec):
    path, _, arg = name.partition(":")
    config = load_config(f"{ROOT / 'configs' / path}:smoke=True{',' + arg if arg else ''}")
    run = setup(config, read_files=False)
    assert run.objective.batch == spec


def test_no_code_outside_the_registry_chooses_by_family_name():
    """No comparison anywhere in the package but the registry involves a config's `trainer` or a
    family's name. (`jaxalign.data` chooses pipelines by record format, `BatchSpec.records`,
    whose names "sft" and "unpaired" are not families.)"""
    names = {*families.FAMILIES, *families.ALIASES}

    def about_family(node):
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, ast.Attribute):
            return node.attr == "trainer"
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return any(about_family(e) for e in node.elts)
        return False

    offenders = []
    for file in (ROOT / "jaxalign").rglob("*.py"):
        if file.name == "families.py" or file.parent.name == "data":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Compare) and any(
                about_family(x) for x in (node.left, *node.comparators)
            ):
                offenders.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_the_dcn_mesh_reaches_make_mesh(monkeypatch):
    seen = {}
    real = sharding.make_mesh

    def spy(shape, *, dcn_shape=None, devices=None):
        seen["dcn"] = dcn_shape
        return real(shape, devices=devices)

    monkeypatch.setattr(sharding, "make_mesh", spy)
    config = load_config(f"{ROOT / 'configs/sft/tiny.py'}:smoke=True")
    setup(config, read_files=False)
    assert seen["dcn"] is None  # one slice
    setup(apply_overrides(config, ["dcn_mesh.data=2"]), read_files=False)
    assert seen["dcn"] == {"data": 2, "fsdp": 1, "tensor": 1}
    assert jax.device_count() == 8
