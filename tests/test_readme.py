"""The README's commands, run in order in a copy of the repository, do what it says
(`tools/readme_commands.py`; `make test` is left out: this is part of it). Slow: the README trains
several tiny runs end to end."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
