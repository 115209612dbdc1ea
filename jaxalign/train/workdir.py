"""The run directory: one run per workdir, its recorded config, its metrics and its summary.

    WORKDIR/config.json    the run's config (readable JSON), written at the first start
    WORKDIR/.lock          held (flock) by the process that runs in it
    WORKDIR/metrics.jsonl  one record per logged step and evaluation
    WORKDIR/summary.json   the end-of-run summary
    WORKDIR/checkpoints/   Orbax checkpoints (jaxalign.checkpoint.manager)

A rerun in the same workdir resumes; one whose config differs in anything but run length and
logging (`RESUMABLE_KEYS`) is refused with the differing keys named, unless the change is accepted
explicitly (`jaxalign train --allow_config_change`), and is then recorded. A second run started in
a workdir that a live run holds is refused. Only process 0 of a multi-host run touches these
files (the lock is a local-filesystem lock: on object stores such as gs:// there is none).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import tempfile

from ml_collections import ConfigDict

from jaxalign.config import base_config, to_dict
from jaxalign.errors import ConfigError

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"

# Keys a resumed run may change: how long it runs, how often it logs, evaluates and saves.
RESUMABLE_KEYS = (
    "steps",
    "log_every",
    "eval_every",
    "eval_batches",
    "checkpoint.every",
    "checkpoint.keep",
    "checkpoint.async_save",
)


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def prepare(workdir: str | os.PathLike) -> pathlib.Path:
    """The workdir as a directory this process can write to (created if missing); a path that is
    a file, or a directory that cannot be written, is a ConfigError naming it."""
    path = pathlib.Path(workdir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"workdir {path}: is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"workdir {path}: cannot be created ({e.strerror})") from None
    try:  # a real write: permissions, read-only filesystems and quotas all show here
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"workdir {path}: is not writable ({e.strerror})") from None
    return path


class RunLock:
    """`with RunLock(workdir):` an exclusive lock on WORKDIR/.lock for the run's lifetime; another
    process holding it is a ConfigError naming its pid. The lock dies with its process."""

    def __init__(self, workdir: pathlib.Path):
        self.path = workdir / LOCK_FILE
        self._file = None

    def __enter__(self):
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise ConfigError(
                f"workdir {self.path.parent}: another run is using it (pid {holder}); wait for "
                "it to finish or use another --workdir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = _plain(value)
    return out


def _plain(value):
    """JSON's view of a value: tuples are lists (so a recorded config compares equal)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_changes(recorded: dict, config: ConfigDict) -> dict[str, tuple]:
    """{dotted key: (recorded value, new value)} for every key whose value differs."""
    old, new = _flat(recorded), _flat(to_dict(config))
    missing = object()
    return {
        k: (old.get(k, missing), new.get(k, missing))
        for k in sorted(old.keys() | new.keys())
        if old.get(k, missing) != new.get(k, missing)
    }


def _show(value) -> str:
    return (
        "(absent)" if not isinstance(value, str | int | float | bool | list | None) else repr(value)
    )


def read_config(workdir: str | os.PathLike) -> dict | None:
    """The recorded config of a run (None when the workdir has none)."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def check_config(workdir: pathlib.Path, config: ConfigDict, *, allow_change: bool) -> list[str]:
    """Check the config against the one recorded in the workdir (if any): a change of anything
    but run length and logging is a ConfigError naming the keys, unless `allow_change`. Returns
    the changed keys (`write_config` records the config once the run has started)."""
    recorded = read_config(workdir)
    changes = {} if recorded is None else config_changes(recorded, config)
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE_KEYS}
    if refused and not allow_change:
        listed = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"workdir {workdir} holds a run with another config ({listed}); use another "
            "--workdir, or pass --allow_config_change to continue this run with the new one"
        )
    return sorted(changes)


def write_config(workdir: pathlib.Path, config: ConfigDict) -> None:
    write_atomic(
        workdir / CONFIG_FILE, json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n"
    )


def config_from_record(recorded: dict) -> ConfigDict:
    """A locked run config rebuilt from its JSON record (lists back to tuples)."""

    def tuples(value):
        if isinstance(value, list):
            return tuple(tuples(v) for v in value)
        if isinstance(value, dict):
            return {k: tuples(v) for k, v in value.items()}
        return value

    config = base_config()
    values = tuples(recorded)
    with config.unlocked():
        for key, value in values.items():
            if key == "loss":  # each loss has its own hyperparameters
                config.loss = ConfigDict(value)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    config[key][sub] = v
            else:
                config[key] = value
    config.lock()
    return config


def trim_metrics(workdir: pathlib.Path, step: int) -> int:
    """Drop the metrics records past `step` (written after the checkpoint a run resumes from), so
    the resumed run does not log those steps twice. Atomic; returns how many were dropped."""
    path = workdir / METRICS_FILE
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if _step_of(line) <= step]
    if len(keep) != len(lines):
        write_atomic(path, "".join(keep))
    return len(lines) - len(keep)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return 1 << 62  # a torn last line (killed mid-write): dropped


def write_summary(workdir: pathlib.Path, summary: dict) -> None:
    write_atomic(workdir / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def read_summary(workdir: pathlib.Path) -> dict | None:
    path = workdir / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None
