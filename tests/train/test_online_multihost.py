"""Two-process online RL: `jaxalign train` (GRPO) on one global 8-device mesh spread over two
processes equals one process on 8 devices.

Two local processes (4 fake CPU devices each, `jax.distributed` through a localhost coordinator,
as tests/train/test_train_multihost.py) run 2 GRPO steps of the tiny model on fsdp=8. Each host
reads its own half of every prompt batch (records [host::2], shuffled per host), samples its
prompts' completions on the global mesh, scores them on the host, and the update batch is the
hosts' rows stitched together: [host 0 | host 1]. The single-process run is the real `train()`
loop with its prompt pipeline replaced by the two hosts' pipelines, concatenated in that order,
so it samples the same prompts in the same rows with the same key (the sampler's random bits are
those of the global row), and trains on the same global batch.

What must agree, logged by process 0 of the pair and by the single process:
- the rollout, exactly: reward, reward_std, rewards/length, completions/mean_length and
  clipped_ratio, frac_reward_zero_std: the statistics of all the hosts' completions (each host
  holds only its own rows; process 0 alone would log half the batch), which equal only if the
  sampled tokens do;
- the update (loss, grad_norm, kl, ...), to float32 rounding: RTOL = 2e-6 relative plus 1e-6
  absolute for the terms that are 0 up to rounding (approx_kl, loss/policy at ratio 1), as in
  tests/train/test_online_mesh.py;
- the params after 2 steps: RTOL relative plus STEP_TOL = 1e-4 of the largest change the
  single-process run made to the tensor (optimizer.eps = 1e-3: a smooth AdamW step; see
  test_online_mesh.py). Step 2 samples from the params after step 1, so its equal rewards also
  show the updated params sample alike.
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
from jaxalign.data import load_tokenizer, make_prompt_pipeline
from jaxalign.train import families, init_params, setup, train

pytestmark = pytest.mark.multiprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
GRPO = ROOT / "configs/grpo/tiny.py"
STEPS = 2
OVERRIDES = [
    f"steps={STEPS}",
    "log_every=1",
    "checkpoint.every=2",
    f"tokenizer={ROOT / 'data/demo/tokenizer.model'}",
    f"data.train={ROOT / 'data/demo/sft_train.jsonl'}",
    "data.eval=",
    "data.batch_size=8",  # 4 prompts per host
    "mesh.data=1",
    "mesh.fsdp=8",
    "mesh.tensor=1",
    "sharding=fsdp",
    "rl.group_size=4",
    "rl.max_new_tokens=6",
    "rl.rewards=(('length', 1.0, {'target': 12, 'scale': 12}),)",
    "optimizer.lr=1e-3",
    "optimizer.eps=1e-3",  # a smooth AdamW step (module docstring)
]
TIMEOUT = 480  # seconds for the two processes together; they are killed after it
RTOL, ATOL_METRIC, STEP_TOL = 2e-6, 1e-6, 1e-4
EXACT = (
    "reward",
    "reward_std",
    "rewards/length",
    "completions/mean_length",
    "completions/clipped_ratio",
    "frac_reward_zero_std",
)
TIMING = {"time/rollout_s", "time/update_s", "rollout_tokens_per_s"}


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
    cmd = [sys.executable, "-m", "jaxalign.cli", "train", "--config", f"{GRPO}:smoke=True"]
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


class _TwoHostPrompts:
    """The prompt batches of a 2-host run, built in one process: each host's batch of B / 2
    prompts (its records, its shuffle, its single length bucket), host 0's rows first; with the
    iterator-state interface the loop checkpoints."""

    def __init__(self, config):
        self.hosts = [
            make_prompt_pipeline(
                config.data.train,
                load_tokenizer(config.tokenizer),
                batch_size=config.data.batch_size // 2,
                max_prompt_len=config.data.max_prompt_len,
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
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "records"}
        return out | {"records": [r for p in parts for r in p["records"]]}

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
    config = apply_overrides(load_config(f"{GRPO}:smoke=True"), list(OVERRIDES))
    assert jax.device_count() == 8 and jax.process_count() == 1
    patch = pytest.MonkeyPatch()
    grpo = families.FAMILIES["grpo"]
    two_hosts = dataclasses.replace(grpo, batches=lambda run, *a, **k: _TwoHostPrompts(run.config))
    patch.setitem(families.FAMILIES, "grpo", two_hosts)
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


@pytest.mark.slow  # about a minute; the fast sibling: test_online_mesh.py (one process, 8 devices)
def test_two_processes_run_grpo_like_one_process(two_process_run, one_process_run):
    one_dir, config = one_process_run
    two, one = _records(two_process_run), _records(one_dir)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        assert sorted(two[step]) == sorted(one[step])
        assert one[step]["reward_std"] > 0  # groups that differ: real advantages
        for key in EXACT:
            assert two[step][key] == one[step][key], f"step {step} {key}"
        for key in sorted(set(one[step]) - set(EXACT) - TIMING - {"step", "split"}):
            np.testing.assert_allclose(
                two[step][key],
                one[step][key],
                rtol=RTOL,
                atol=ATOL_METRIC,
                err_msg=f"step {step} {key}",
            )
    model_config = models.get_preset(config.model.preset)
    got = _final_params(two_process_run, model_config)
    want = _final_params(one_dir, model_config)
    start = jax.device_get(init_params(setup(config)))
    for (path, a), b, b0 in zip(
        jax.tree_util.tree_flatten_with_path(got)[0],
        jax.tree.leaves(want),
        jax.tree.leaves(start),
        strict=True,
    ):
        np.testing.assert_allclose(
            a,
            b,
            rtol=RTOL,
            atol=STEP_TOL * np.abs(b - b0).max(),
            err_msg=jax.tree_util.keystr(path),
        )
