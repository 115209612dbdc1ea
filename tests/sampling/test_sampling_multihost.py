"""Two-process generation: each process samples its own prompts on one global 8-device mesh and
`gather_to_host0` collects every row; the result equals one process generating all prompts.

Two local processes (4 fake CPU devices each, `jax.distributed` through a localhost coordinator)
build the same tiny model, shard it over fsdp=8, and pass 2 prompts each (process p holds prompts
2p, 2p + 1 of the global batch). Process 0 writes the gathered result; the test compares it with
this process generating the 4 prompts on its own 8 devices: tokens, lengths, finish reasons and
texts equal, log-probs to float32 rounding (1e-5), prompt_index counting the global prompts.
"""

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

from jaxalign import models as M
from jaxalign.sampling import SamplingOptions, gather_to_host0, generate, prompts_from_ids
from jaxalign.sharding import ShardingRules, initialize, make_mesh, shard_params

pytestmark = pytest.mark.multiprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPTS = [[1, 45, 12, 99, 7], [1, 300, 301], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 2, 9]]
OPTIONS = dict(max_new_tokens=8, n=2, temperature=0.9, top_p=0.95, eos_id=2, pad_id=3)
TIMEOUT = 300


class _Letters:
    def decode(self, ids):
        return "".join(chr(97 + int(i) % 26) for i in ids)


def _model():
    config = M.get_preset("tiny-64")
    params = M.init_params(config, jax.random.key(0))
    params["unembed"]["kernel"] = params["unembed"]["kernel"] * 20.0
    mesh, rules = make_mesh({"fsdp": 8}), ShardingRules.preset("fsdp")
    return config, shard_params(params, mesh, rules, M.param_logical_axes(config)), mesh, rules


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes; fast sibling: test_mesh.py (one process, 8 devices)
def test_two_processes_gather_the_rows_of_one(tmp_path):
    out = tmp_path / "gathered.json"
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAXALIGN_COORDINATOR=f"localhost:{port}",
            JAXALIGN_NUM_PROCESSES="2",
            JAXALIGN_PROCESS_ID=str(pid),
        )
        log = open(tmp_path / f"process{pid}.log", "w+")
        args = [sys.executable, __file__, str(out)]
        procs.append((subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT), log))
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
    for pid, (proc, log) in enumerate(procs):
        log.seek(0)
        text = log.read()
        log.close()
        assert proc.returncode == 0, f"process {pid} exited with {proc.returncode}:\n{text[-4000:]}"

    got = json.loads(out.read_text())
    config, params, mesh, rules = _model()
    want = generate(
        config,
        params,
        prompts_from_ids(PROMPTS, 3, buckets=[16]),
        rng=jax.random.key(1),
        options=SamplingOptions(**OPTIONS),
        tokenizer=_Letters(),
        mesh=mesh,
        rules=rules,
    )
    np.testing.assert_array_equal(got["tokens"], want.tokens)
    np.testing.assert_array_equal(got["lengths"], want.lengths)
    assert got["finish_reason"] == want.finish_reason.tolist()
    assert got["text"] == want.text.tolist()
    np.testing.assert_array_equal(got["prompt_index"], [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_allclose(got["logprobs"], want.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["policy_logprobs"], want.policy_logprobs, atol=1e-5, rtol=0)


def _worker(out: str) -> None:
    """One of the two processes: its own 2 prompts, then every row gathered; process 0 writes."""
    initialize()
    me = jax.process_index()
    config, params, mesh, rules = _model()
    mine = prompts_from_ids(PROMPTS[2 * me : 2 * me + 2], 3, buckets=[16])
    options = SamplingOptions(**OPTIONS)
    result = generate(
        config,
        params,
        mine,
        rng=jax.random.key(1),
        options=options,
        tokenizer=_Letters(),
        mesh=mesh,
        rules=rules,
    )
    assert result.tokens.shape[0] == 4, result.tokens.shape  # this process's rows only
    result = gather_to_host0(result)
    if me == 0:
        with open(out, "w") as f:
            json.dump({k: np.asarray(v).tolist() for k, v in result.__dict__.items()}, f)


if __name__ == "__main__":
    _worker(sys.argv[1])
