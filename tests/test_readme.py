"""The README's commands, run in order in a copy of the repository, do what it says
(`tools/readme_commands.py`; `make test` is left out: this is part of it). Slow: the README trains
several tiny runs end to end. Fast: how a block splits into commands."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import readme_commands  # noqa: E402


def test_a_block_splits_into_commands():
    """Continuations join; comments and blank lines drop; an apostrophe in a comment or inside
    double quotes opens nothing; a single-quoted argument over several lines is one command with
    its lines (and the '#' lines inside it) as written."""
    block = """jaxalign eval --workdir runs/a   # the run's own config
# a comment line

jaxalign train --config c.py \\
    --config.reference.soup="('checkpoint:runs/s',)"
python -c '
import json
# kept: inside the quote
print(json.dumps({"a": 1 > 0}))
'
echo done"""
    assert readme_commands.commands(block) == [
        "jaxalign eval --workdir runs/a   # the run's own config",
        "jaxalign train --config c.py  --config.reference.soup=\"('checkpoint:runs/s',)\"",
        "python -c '\nimport json\n# kept: inside the quote\nprint(json.dumps({\"a\": 1 > 0}))\n'",
        "echo done",
    ]


def _copy_of_the_repository(dest: pathlib.Path) -> pathlib.Path:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (dest / ".venv").symlink_to(ROOT / ".venv")  # installed already; make finds its stamp
    return dest


@pytest.mark.slow
def test_the_readme_commands_run_in_order(tmp_path):
    repo = _copy_of_the_repository(tmp_path / "jaxalign")
    env = dict(os.environ, PYTHONPATH=str(repo), XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "tools/readme_commands.py", "--skip", "make test"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "README commands: all commands succeeded" in proc.stdout
    assert "Held-out preference pairs" in proc.stdout  # make demo ran to its report
