"""Launchers: the TPU pod launcher's dry-run gcloud commands and the SLURM sbatch script."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TPU_POD = REPO / "launch" / "tpu_pod.py"
SBATCH = REPO / "launch" / "slurm.sbatch"

BASE = ["--name", "dpo", "--zone", "us-east5-a", "--accelerator", "v5p-64"]
TRAIN = ["--config", "configs/dpo/tiny.py", "--workdir", "gs://bucket/runs/dpo"]


def dry_run(*args: str) -> list[list[str]]:
    """Runs the launcher with --dry_run; returns the printed commands, split into words."""
    proc = subprocess.run(
        [sys.executable, str(TPU_POD), "--dry_run", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    return [shlex.split(line.removesuffix(" &")) for line in lines]


def find(cmds, *prefix):
    hits = [c for c in cmds if c[: len(prefix)] == list(prefix)]
    assert hits, f"no command starting with {prefix} in {cmds}"
    return hits


def remote(cmd) -> str:
    (flag,) = [w for w in cmd if w.startswith("--command=")]
    return flag.removeprefix("--command=")


def test_tpu_vm_full_flow():
    cmds = dry_run(*BASE, *TRAIN, "--", "--config.steps=10", "--config.optimizer.lr=1e-6")
    (create,) = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create", "dpo")
    assert {"--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--zone=us-east5-a"} <= set(
        create
    )
    find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "describe", "dpo")
    (scp,) = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")
    assert "--worker=all" in scp and scp[6] == "dpo:jaxalign-src.tgz"
    ssh = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "dpo")
    extract, install, train, logs = ssh
    assert all("--worker=all" in c for c in (extract, install, train))
    assert "tar -xzf ~/jaxalign-src.tgz" in remote(extract)
    assert "pip install" in remote(install) and "'.[tpu]'" in remote(install)
    line = remote(train)
    assert (
        "nohup ~/jaxalign-venv/bin/jaxalign train --config configs/dpo/tiny.py "
        "--workdir gs://bucket/runs/dpo --config.steps=10 --config.optimizer.lr=1e-6" in line
    )
    assert "PYTHONUNBUFFERED=1" in line and "> ~/jaxalign-train.log 2>&1" in line
    assert "--worker=0" in logs and "tail" in remote(logs)
    # every remote command is valid shell
    for c in ssh:
        subprocess.run(["bash", "-n", "-c", remote(c)], check=True)
    # order: create, copy, install, train, logs
    order = [cmds.index(c) for c in (create, scp, install, train, logs)]
    assert order == sorted(order)


def test_overrides_with_spaces_are_quoted():
    cmds = dry_run(*BASE, *TRAIN, "--steps", "train", "--", "--config.name=a b")
    (train,) = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "dpo")
    words = shlex.split(remote(train).split("nohup ", 1)[1].split(" >", 1)[0])
    assert words[-1] == "--config.name=a b"


def test_queued_multislice_spot():
    cmds = dry_run(
        *BASE,
        *TRAIN,
        "--queued",
        "--num_slices",
        "2",
        "--spot",
        "--project",
        "proj",
        "--git",
        "https://example.com/jaxalign.git",
        "--git_ref",
        "v0.1",
        "--env",
        "FOO=bar",
    )
    (create,) = find(cmds, "gcloud", "compute", "tpus", "queued-resources", "create", "dpo")
    assert {"--node-count=2", "--node-prefix=dpo", "--spot", "--project=proj"} <= set(create)
    assert "--runtime-version=v2-alpha-tpuv5" in create
    polls = find(cmds, "gcloud", "compute", "tpus", "queued-resources", "describe", "dpo")
    assert any("--format=value(state.state)" in p for p in polls)
    for node in ("dpo-0", "dpo-1"):
        ssh = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh", node)
        assert "git clone --quiet https://example.com/jaxalign.git" in remote(ssh[0])
        assert "git checkout --quiet v0.1" in remote(ssh[0])
        assert "FOO=bar" in remote(ssh[2]) and "jaxalign train" in remote(ssh[2])
        assert "--config.dcn_mesh.data=2" in remote(ssh[2])  # only data crosses slices
    assert all(c[:5] != ["gcloud", "compute", "tpus", "tpu-vm", "scp"] for c in cmds)


def test_stop_and_delete():
    cmds = dry_run(*BASE, "--steps", "stop,delete")
    stop, delete = cmds
    assert stop[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dpo"]
    assert "kill" in remote(stop) and "--worker=all" in stop
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "dpo"]
    assert "--quiet" in delete
    queued = dry_run(*BASE, "--queued", "--steps", "delete")
    assert queued == [
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            "dpo",
            "--force",
            "--quiet",
            "--zone=us-east5-a",
        ]
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (BASE, "--config and --workdir are required"),
        ([*BASE, *TRAIN, "--num_slices", "2"], "needs --queued"),
        ([*BASE, *TRAIN, "--steps", "train,deploy"], "unknown steps ['deploy']"),
        ([*BASE, *TRAIN, "--env", "NOVALUE"], "KEY=VALUE"),
    ],
)
def test_launcher_argument_errors(args, message):
    proc = subprocess.run(
        [sys.executable, str(TPU_POD), *args, "--dry_run"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert message in proc.stderr


def test_sbatch_script_syntax_and_lines():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    assert text.startswith("#!/bin/bash\n")
    for directive in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--signal=TERM@"):
        assert f"#SBATCH {directive}" in text
    assert (
        'srun --kill-on-bad-exit=1 \\\n  "$JAXALIGN_VENV/bin/jaxalign" train --config "$CONFIG"'
        in (text)
    )


def test_sbatch_script_runs_srun_with_jaxalign_train(tmp_path):
    """Runs the script with a stub `srun` on PATH and checks the command it would launch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nprintf "%s\\n" "SRUN" "$@"\n')
    srun.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "JAXALIGN_VENV": "/opt/venv",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }
    proc = subprocess.run(
        [
            "bash",
            str(SBATCH),
            "configs/sft/tiny.py",
            "/shared/run",
            "--config.steps=3",
            "--config.name=a b",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.split("SRUN\n", 1)[1].splitlines()
    assert argv == [
        "--kill-on-bad-exit=1",
        "/opt/venv/bin/jaxalign",
        "train",
        "--config",
        "configs/sft/tiny.py",
        "--workdir",
        "/shared/run",
        "--config.steps=3",
        "--config.name=a b",
    ]
    usage = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "usage" in usage.stderr
