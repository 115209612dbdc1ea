"""Shared fixtures for the data tests: the bundled demo directory / tokenizer and a JSONL writer."""

import json
import pathlib

import pytest

from jaxalign.data import load_tokenizer

DEMO = pathlib.Path(__file__).resolve().parents[2] / "data" / "demo"


@pytest.fixture(scope="session")
def demo_dir() -> pathlib.Path:
    return DEMO


@pytest.fixture(scope="session")
def demo_tokenizer():
    return load_tokenizer(str(DEMO / "tokenizer.model"))


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, records) -> path; dict records are JSON-encoded, strings written as-is."""

    def write(name, records) -> str:
        path = tmp_path / name
        with open(path, "w") as f:
            for r in records:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
        return str(path)

    return write
