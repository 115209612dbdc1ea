"""Run the README's shell commands in order, as a new user would, and stop at the first failure.

    python tools/readme_commands.py [--readme README.md] [--skip "make test"] [--list]

Every ```bash block of the README runs, in document order, in one bash session started in the
README's directory (so `source .venv/bin/activate` carries over), with `set -e`. A block preceded
by a line `<!-- not run: REASON -->` is skipped (cloud launchers, hub models, TPUs) and listed
with its reason. `--skip PREFIX` skips the commands starting with PREFIX (e.g. `make test` when
this script itself runs inside the test suite). Exit status: 0 when every command succeeded.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shlex
import subprocess
import sys
import time

SKIP_MARK = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->")


def blocks(readme: str) -> list[tuple[int, str, str]]:
    """(line number, block text, skip reason or "") for every ```bash block."""
    out, lines = [], readme.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start, body = i + 1, []
            previous = next((x for x in reversed(lines[:i]) if x.strip()), "")
            reason = SKIP_MARK.search(previous)
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            out.append((start, "\n".join(body), reason.group(1) if reason else ""))
        i += 1
    return out


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped; a
    single-quoted argument spanning lines (`python -c '...'`) stays one command, its lines as
    written."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out, pending = [], ""
    for line in joined.splitlines():
        if pending:  # inside an open single quote: keep the line verbatim
            pending += "\n" + line
        elif line.strip() and not line.startswith("#"):
            pending = line.strip()
        if pending and _complete(pending):
            out.append(pending)
            pending = ""
    return out + ([pending] if pending else [])


def _complete(command: str) -> bool:
    """Whether `command` closes every quote it opens (bash comments aside)."""
    try:
        shlex.split(command, comments=True)
    except ValueError:  # "No closing quotation"
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readme", default=str(pathlib.Path(__file__).parents[1] / "README.md"))
    parser.add_argument(
        "--skip", action="append", default=[], help="skip commands with this prefix"
    )
    parser.add_argument("--list", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    readme = pathlib.Path(args.readme).resolve()
    script, shown = ["set -e"], []
    for line, block, reason in blocks(readme.read_text()):
        if reason:
            shown.append(f"README.md:{line}: skipped ({reason})")
            continue
        for command in commands(block):
            if any(command.startswith(p) for p in args.skip):
                shown.append(f"README.md:{line}: skipped by --skip: {command}")
                continue
            shown.append(f"README.md:{line}: {command}")
            quoted = command.replace("'", "'\\''")
            script.append(f"echo '>>> README.md:{line}: {quoted}' >&2")
            script.append(command)
    print("\n".join(shown), flush=True)
    if args.list:
        return 0
    start = time.perf_counter()
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=readme.parent)
    status = "all commands succeeded" if proc.returncode == 0 else f"failed ({proc.returncode})"
    print(f"README commands: {status} in {time.perf_counter() - start:.0f} s", flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
