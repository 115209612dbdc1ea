"""Run `jaxalign train` on a Cloud TPU VM pod slice (or several slices), from your workstation.

Standard library only; every action is a `gcloud` command, printed before it runs. Steps, in order
(pick with --steps, default create,copy,install,train,logs):

  create   reuse the TPU VM (or queued resource) NAME if it exists, else create it: `gcloud compute
           tpus tpu-vm create`, or with --queued `gcloud compute tpus queued-resources create` and
           wait until it is ACTIVE (queued resources are how spot/reserved capacity and multi-slice
           (--num_slices) are obtained);
  copy     ship the working tree (a tarball without .git/.venv, scp --worker=all), or with --git
           clone URL at --git_ref on every worker;
  install  a Python 3.11 venv at ~/jaxalign-venv with `pip install -e .[tpu]`, built with uv
           (TPU VM images ship Python 3.10);
  train    on every worker of every slice at once (`ssh --worker=all`): stop a previous run, then
           start `jaxalign train --config C --workdir W <overrides>` detached (nohup), logging to
           ~/jaxalign-train.log. Each worker discovers the others through jaxalign's
           `sharding.initialize()` (TPU metadata server; MEGASCALE_* for multi-slice);
  logs     follow worker 0's log until the run ends (Ctrl-C stops following, not training);
  stop     stop the run on every worker;
  delete   delete the TPU VM / queued resource (and its nodes).

Examples:
  python launch/tpu_pod.py --name dpo-8b --zone us-east5-a --accelerator v5p-64 \\
      --config configs/dpo/llama3_8b.py --workdir gs://my-bucket/runs/dpo-8b -- --config.steps=2000
  python launch/tpu_pod.py --name dpo-8b --zone us-east5-a --accelerator v5p-64 --steps stop,delete
  add --dry_run to print every command without running any.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("create", "copy", "install", "train", "logs", "stop", "delete")
DEFAULT_STEPS = "create,copy,install,train,logs"
REMOTE_DIR = "~/jaxalign"
VENV = "~/jaxalign-venv"
LOG = "~/jaxalign-train.log"
PIDFILE = "~/jaxalign-train.pid"
# TPU VM runtime images per accelerator generation (override with --runtime_version).
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    else:
        overrides = []
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Arguments after -- go to `jaxalign train` (e.g. --config.optimizer.lr=1e-6).",
    )
    p.add_argument("--name", required=True, help="TPU VM / queued resource name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", help="GCP project (default: gcloud's configured project)")
    p.add_argument("--accelerator", help="accelerator type, e.g. v5p-64, v5litepod-256, v6e-64")
    p.add_argument("--runtime_version", help="TPU software version (default: by generation)")
    p.add_argument("--queued", action="store_true", help="use a queued resource")
    p.add_argument("--num_slices", type=int, default=1, help="multi-slice (needs --queued)")
    p.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    p.add_argument("--reserved", action="store_true", help="use reserved capacity")
    p.add_argument("--config", help="jaxalign config, relative to the repo root")
    p.add_argument("--workdir", help="run directory, a gs:// path shared by all workers")
    p.add_argument("--git", help="clone this repository URL on the workers instead of copying")
    p.add_argument("--git_ref", default="main", help="branch, tag or commit for --git")
    p.add_argument("--extras", default="tpu", help="pip extras installed with jaxalign")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the training processes (repeatable)",
    )
    p.add_argument("--steps", default=DEFAULT_STEPS, help=f"comma list of {','.join(STEPS)}")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    args.overrides = overrides
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in args.steps if s not in STEPS]
    if bad:
        p.error(f"unknown steps {bad}; choose from {list(STEPS)}")
    if "create" in args.steps and not args.accelerator:
        p.error("--accelerator is required to create the TPU")
    if "train" in args.steps and not (args.config and args.workdir):
        p.error("--config and --workdir are required for the train step")
    if args.num_slices > 1 and not args.queued:
        p.error("--num_slices > 1 needs --queued (multi-slice is a queued resource)")
    bad_env = [e for e in args.env if "=" not in e]
    if bad_env:
        p.error(f"--env expects KEY=VALUE, got {bad_env}")
    return args


class Runner:
    """Prints each command; runs it unless dry-run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def note(self, text: str) -> None:
        print(f"# {text}", flush=True)

    def run(self, cmd: list[str], check: bool = True) -> int:
        print(shlex.join(cmd), flush=True)
        if self.dry_run:
            return 0
        code = subprocess.run(cmd).returncode
        if check and code:
            sys.exit(f"command failed with exit code {code}: {shlex.join(cmd)}")
        return code

    def output(self, cmd: list[str]) -> tuple[int, str]:
        """Runs a query command; in dry-run prints it and reports "not found"."""
        print(shlex.join(cmd), flush=True)
        if self.dry_run:
            return 1, ""
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return proc.returncode, proc.stdout.strip()


def runtime_version(args) -> str:
    if args.runtime_version:
        return args.runtime_version
    generation = args.accelerator.split("-")[0]
    if generation not in RUNTIME_VERSIONS:
        sys.exit(f"no default runtime version for {args.accelerator}; pass --runtime_version")
    return RUNTIME_VERSIONS[generation]


def gcloud(args, *words: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}"]
    return cmd + ([f"--project={args.project}"] if args.project else [])


def node_names(args) -> list[str]:
    """TPU VM names: NAME, or NAME-0 .. NAME-(k-1) for a k-slice queued resource."""
    if args.num_slices == 1:
        return [args.name]
    return [f"{args.name}-{i}" for i in range(args.num_slices)]


def step_create(args, r: Runner) -> None:
    kind = "queued-resources" if args.queued else "tpu-vm"
    code, state = r.output(gcloud(args, kind, "describe", args.name, "--format=value(state)"))
    if code == 0:
        r.note(f"reusing {kind} {args.name} (state: {state})")
    else:
        if r.dry_run:
            r.note(f"dry run: assuming {kind} {args.name} does not exist")
        capacity = ["--spot"] if args.spot else []
        capacity += ["--reserved"] if args.reserved else []
        common = [
            f"--accelerator-type={args.accelerator}",
            f"--runtime-version={runtime_version(args)}",
        ]
        if args.queued:
            nodes = (
                [f"--node-id={args.name}"]
                if args.num_slices == 1
                else [f"--node-count={args.num_slices}", f"--node-prefix={args.name}"]
            )
            r.run(gcloud(args, "queued-resources", "create", args.name, *nodes, *common, *capacity))
        else:
            common[1] = f"--version={runtime_version(args)}"
            r.run(gcloud(args, "tpu-vm", "create", args.name, *common, *capacity))
    if args.queued:
        wait_active(args, r)


def wait_active(args, r: Runner, poll_s: float = 30.0) -> None:
    query = gcloud(args, "queued-resources", "describe", args.name, "--format=value(state.state)")
    while True:
        code, state = r.output(query)
        if r.dry_run:
            r.note("dry run: would poll until state is ACTIVE")
            return
        if code == 0 and state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            sys.exit(f"queued resource {args.name} is {state}")
        r.note(f"queued resource {args.name}: {state or 'unknown'}; waiting")
        time.sleep(poll_s)


def ssh_all(args, r: Runner, command: str, worker: str = "all", nodes: list[str] | None = None):
    """Runs `command` on `worker` of each node; several nodes (slices) run concurrently."""
    nodes = node_names(args) if nodes is None else nodes
    cmds = [
        gcloud(args, "tpu-vm", "ssh", node, f"--worker={worker}", f"--command={command}")
        for node in nodes
    ]
    if len(cmds) == 1:
        r.run(cmds[0])
        return
    for cmd in cmds:
        print(shlex.join(cmd) + " &", flush=True)
    if r.dry_run:
        return
    procs = [subprocess.Popen(cmd) for cmd in cmds]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"ssh failed on nodes {[n for n, c in zip(nodes, codes, strict=True) if c]}")


def step_copy(args, r: Runner) -> None:
    if args.git:
        ssh_all(
            args,
            r,
            f"rm -rf {REMOTE_DIR} && git clone --quiet {shlex.quote(args.git)} {REMOTE_DIR} && "
            f"cd {REMOTE_DIR} && git checkout --quiet {shlex.quote(args.git_ref)}",
        )
        return
    tarball = str(Path(tempfile.gettempdir()) / f"jaxalign-{args.name}.tgz")
    excludes = [f"--exclude={d}" for d in ("./.git", "./.venv", "__pycache__", "*.egg-info")]
    r.run(["tar", "-czf", tarball, *excludes, "-C", str(REPO), "."])
    for node in node_names(args):
        r.run(gcloud(args, "tpu-vm", "scp", tarball, f"{node}:jaxalign-src.tgz", "--worker=all"))
    ssh_all(
        args,
        r,
        f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
        f"tar -xzf ~/jaxalign-src.tgz -C {REMOTE_DIR}",
    )


def step_install(args, r: Runner) -> None:
    ssh_all(
        args,
        r,
        "(test -x ~/.local/bin/uv || curl -LsSf https://astral.sh/uv/install.sh | sh) "
        f"&& ~/.local/bin/uv venv --quiet --allow-existing --python 3.11 {VENV} "
        f"&& cd {REMOTE_DIR} && ~/.local/bin/uv pip install --quiet --python {VENV}/bin/python "
        f"-e '.[{args.extras}]'",
    )


STOP = (
    f"if [ -f {PIDFILE} ]; then kill $(cat {PIDFILE}) 2>/dev/null; "
    f"while kill -0 $(cat {PIDFILE}) 2>/dev/null; do sleep 1; done; rm -f {PIDFILE}; fi"
)


def train_command(args) -> str:
    """Shell command started on every worker: stop a previous run, start `jaxalign train`."""
    env = shlex.join(["PYTHONUNBUFFERED=1", *args.env])
    overrides = list(args.overrides)
    if args.num_slices > 1 and not any(o.startswith("--config.dcn_mesh.") for o in overrides):
        # Slices talk over the data-centre network: only data parallelism crosses them.
        overrides.insert(0, f"--config.dcn_mesh.data={args.num_slices}")
    train = shlex.join(["train", "--config", args.config, "--workdir", args.workdir, *overrides])
    return (
        f"{STOP}; cd {REMOTE_DIR} && env {env} nohup {VENV}/bin/jaxalign {train} "
        f"> {LOG} 2>&1 < /dev/null & echo $! > {PIDFILE}"
    )


def step_train(args, r: Runner) -> None:
    ssh_all(args, r, train_command(args))


def step_logs(args, r: Runner) -> None:
    # --pid makes tail exit when the training process on worker 0 ends.
    follow = f"tail -n +1 -F --pid=$(cat {PIDFILE}) {LOG}"
    ssh_all(args, r, follow, worker="0", nodes=node_names(args)[:1])


def step_stop(args, r: Runner) -> None:
    ssh_all(args, r, STOP)


def step_delete(args, r: Runner) -> None:
    if args.queued:
        r.run(gcloud(args, "queued-resources", "delete", args.name, "--force", "--quiet"))
    else:
        r.run(gcloud(args, "tpu-vm", "delete", args.name, "--quiet"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    r = Runner(args.dry_run)
    actions = {
        "create": step_create,
        "copy": step_copy,
        "install": step_install,
        "train": step_train,
        "logs": step_logs,
        "stop": step_stop,
        "delete": step_delete,
    }
    for step in STEPS:  # canonical order, whatever order --steps lists them in
        if step in args.steps:
            r.note(f"step {step}")
            actions[step](args, r)


if __name__ == "__main__":
    main()
