"""Two-process training: `jaxalign train` on one global 8-device mesh spread over two processes.

Two local processes (4 fake CPU devices each, `jax.distributed` through a localhost coordinator
found by `jaxalign.sharding.initialize` from JAXALIGN_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID)
run the tiny DPO smoke config on a global mesh fsdp=8. The checkpoint they write together is then
restored in this single process and compared with a single-process run on 8 devices.

What the single-process run must see. `data.batch_size` (B pairs) is the global batch: each of
the two hosts reads B / 2 pairs per step from its own slice of the records (records [host::2],
shuffled per host), its rows form block `host` of the global batch, and its `seq_index` is local
(the objective offsets block g by g * sequences-per-host, `num_groups = jax.process_count()`). One
process reading the whole file shuffles differently and would see other batches, so the
single-process run is the real `train()` loop with its data pipeline replaced by the two hosts'
pipelines, concatenated: rows [host 0 | host 1], and pair k of host g becomes pair g * B/2 + k,
re-indexed to the one-host layout (chosen sequences 0..B-1, then rejected B..2B-1). That is the
global batch the two processes hold, with the pairs in the same order, so the per-pair losses and
their sum come out in the same order.

Both runs then execute the same SPMD program on the same mesh; they differ only in how the
cross-device reductions are carried out (in-process vs across processes), so losses, gradient
norms and weights agree to float32 rounding, not to the bit: the logged loss, gradient norm and
token count to RTOL = 2e-6 relative, as in tests/train/test_mesh_equivalence.py. The weights
after 3 AdamW steps: relative RTOL, and absolutely RTOL times the tensor's largest weight, because
a weight near 0 carries the rounding of its updates, not a rounding relative to itself. For that
to hold, the AdamW step lr * m / (sqrt(v) + eps) must not amplify gradient rounding: with the
default eps = 1e-8 it is ~lr * sign(g) for every |g| >> eps, so a weight whose gradient is within
rounding of 0 may step either way (measured: one unembedding weight of a rare token differed by
1.8e-7, 0.2% of its step). The runs here use eps = 1e-3, where the step is smooth in g (its error
is at most lr * |dg| / eps, ~3e-8 for the gradient rounding of the mesh-equivalence test), while
a missing or wrong update (~lr = 5e-5 to 1e-4 per step) still fails by orders of magnitude.
"""

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxalign import models
from jaxalign.checkpoint import manager as ckpt
from jaxalign.config import apply_overrides, load_config
from jaxalign.data import load_tokenizer, make_pair_pipeline
from jaxalign.train import families, train

pytestmark = pytest.mark.multiprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
DPO = ROOT / "configs/dpo/tiny.py"
STEPS = 3
OVERRIDES = [
    f"steps={STEPS}",
    "log_every=1",
    "checkpoint.every=3",
    "data.eval=",
    "mesh.data=1",
    "mesh.fsdp=8",
    "mesh.tensor=1",
    "sharding=fsdp",
    "optimizer.eps=1e-3",  # a well-conditioned AdamW step (module docstring)
]
TIMEOUT = 420  # seconds for the two processes together; they are killed after it
RTOL = 2e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _records(workdir) -> dict[int, dict]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == "train"}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_hosts")
    port = _free_port()
    cmd = [sys.executable, "-m", "jaxalign.cli", "train", "--config", f"{DPO}:smoke=True"]
    cmd += ["--workdir", str(workdir), *(f"--config.{o}" for o in OVERRIDES)]
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAXALIGN_COORDINATOR=f"localhost:{port}",
            JAXALIGN_NUM_PROCESSES="2",
            JAXALIGN_PROCESS_ID=str(pid),
        )
        log = open(workdir.parent / f"{workdir.name}-process{pid}.log", "w+")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, log))
    deadline = time.monotonic() + TIMEOUT
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, _ in procs:  # never leave a process waiting on its peer
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    outputs = []
    for proc, log in procs:
        log.seek(0)
        outputs.append((proc.returncode, log.read()))
        log.close()
    for pid, (rc, out) in enumerate(outputs):
        assert rc == 0, f"process {pid} exited with {rc}:\n{out[-4000:]}"
    return workdir


class _TwoHostBatches:
    """The global batches of a 2-host run, built in one process (see the module docstring), with
    the iterator-state interface the training loop checkpoints."""

    def __init__(self, config):
        tokenizer = load_tokenizer(str(ROOT / config.tokenizer))
        self.hosts = [
            make_pair_pipeline(
                str(ROOT / config.data.train),
                tokenizer,
                batch_size=config.data.batch_size // 2,
                max_len=config.data.max_len,
                max_prompt_len=config.data.max_prompt_len,
                pack=config.data.pack,
                seed=config.data.shuffle_seed,
                template=config.data.template,
                process_index=host,
                process_count=2,
                num_epochs=None,
            )
            for host in range(2)
        ]

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(h) for h in self.hosts]
        P = parts[0]["example_mask"].shape[0]  # pairs per host
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        seq_index = []
        for g, p in enumerate(parts):
            s = p["seq_index"]
            chosen = s < P
            glob = np.where(chosen, g * P + s, 2 * P + g * P + (s - P))
            seq_index.append(np.where(s >= 0, glob, -1))
        # Single-host layout: 2P global pairs, chosen sequences 0..2P-1, rejected 2P..4P-1.
        out["seq_index"] = np.concatenate(seq_index).astype(np.int32)
        return out

    @property
    def num_bad_records(self) -> int:
        return sum(h.num_bad_records for h in self.hosts)

    @property
    def num_truncated(self) -> int:
        return sum(h.num_truncated for h in self.hosts)

    def get_state(self):
        return {"hosts": [h.get_state() for h in self.hosts]}

    def set_state(self, state):
        for h, s in zip(self.hosts, state["hosts"], strict=True):
            h.set_state(s)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_host")
    config = apply_overrides(load_config(f"{DPO}:smoke=True"), list(OVERRIDES))
    with config.unlocked():
        config.tokenizer = str(ROOT / config.tokenizer)
    assert jax.device_count() == 8 and jax.process_count() == 1
    patch = pytest.MonkeyPatch()
    paired = families.FAMILIES["paired"]
    two_hosts = dataclasses.replace(
        paired, batches=lambda run, *a, **k: _TwoHostBatches(run.config)
    )
    patch.setitem(families.FAMILIES, "paired", two_hosts)
    try:
        train(config, workdir)
    finally:
        patch.undo()
    return workdir, config


def _final_params(workdir, model_config):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        models.abstract_params(model_config),
    )
    return jax.device_get(ckpt.load_params(workdir, abstract))


@pytest.mark.slow  # two processes; fast sibling: test_mesh_equivalence.py (one process, 8 devices)
def test_two_processes_train_like_one_process_on_the_same_global_batches(
    two_process_run, one_process_run
):
    one_dir, config = one_process_run
    two, one = _records(two_process_run), _records(one_dir)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        for key in ("loss", "grad_norm", "tokens"):
            np.testing.assert_allclose(
                two[step][key], one[step][key], rtol=RTOL, err_msg=f"step {step} {key}"
            )
    # Both wrote step 3; the two-process checkpoint restores in this one process.
    model_config = models.get_preset(config.model.preset)
    got = _final_params(two_process_run, model_config)
    want = _final_params(one_dir, model_config)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(
            a, b, rtol=RTOL, atol=RTOL * np.abs(b).max(), err_msg=jax.tree_util.keystr(path)
        )
