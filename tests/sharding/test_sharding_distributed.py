"""Cluster detection (pure functions on env dicts) and a real 2-process jax.distributed run."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxalign.sharding import ClusterSpec, detect_cluster, parse_nodelist
from jaxalign.sharding.distributed import parse_tasks_per_node

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node001", ["node001"]),
        ("node001,host2", ["node001", "host2"]),
        ("node[001-004]", ["node001", "node002", "node003", "node004"]),
        ("node[001,007-009],gpu7", ["node001", "node007", "node008", "node009", "gpu7"]),
        ("a[8-10]", ["a8", "a9", "a10"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("gpu-[01-02],cpu-[3,5]", ["gpu-01", "gpu-02", "cpu-3", "cpu-5"]),
    ],
)
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


def test_parse_nodelist_error_names_input():
    with pytest.raises(ValueError, match=r"node\[001-x\]"):
        parse_nodelist("node[001-x]")


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert parse_tasks_per_node("1") == [1]
    with pytest.raises(ValueError, match="cannot parse"):
        parse_tasks_per_node("4x2")


def test_nothing_detected_is_single_process():
    assert detect_cluster({}) is None
    assert detect_cluster({"HOME": "/root"}) is None


def test_generic_env():
    env = {
        "JAXALIGN_COORDINATOR": "10.0.0.1:1234",
        "JAXALIGN_NUM_PROCESSES": "4",
        "JAXALIGN_PROCESS_ID": "3",
    }
    assert detect_cluster(env) == ClusterSpec("env", "10.0.0.1:1234", 4, 3)
    with pytest.raises(ValueError, match=r"JAXALIGN_PROCESS_ID.*missing"):
        detect_cluster({k: v for k, v in env.items() if k != "JAXALIGN_PROCESS_ID"})
    with pytest.raises(ValueError, match="process_id 4 out of range for 4 processes"):
        detect_cluster({**env, "JAXALIGN_PROCESS_ID": "4"})
    assert (
        detect_cluster({**env, "JAXALIGN_NUM_PROCESSES": "1", "JAXALIGN_PROCESS_ID": "0"}) is None
    )


SLURM = {
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "5",
    "SLURM_NODEID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_STEP_NODELIST": "gpu[017-018]",
    "SLURM_JOB_NODELIST": "gpu[017-018],gpu020",
}


def test_slurm_one_task_per_node():
    env = {**SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    env["SLURM_TASKS_PER_NODE"] = "1(x2)"
    port = 61440 + 123456 % 4096
    assert detect_cluster(env) == ClusterSpec("slurm", f"gpu017:{port}", 2, 1, None)


def test_slurm_one_task_per_gpu_sets_local_device():
    env = {**SLURM, "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "JAXALIGN_COORDINATOR_PORT": "7777"}
    assert detect_cluster(env) == ClusterSpec("slurm", "gpu017:7777", 8, 5, (1,))
    # SLURM already bound one GPU per task (--gpus-per-task=1): JAX sees it as local device 0.
    bound = {**env, "CUDA_VISIBLE_DEVICES": "1"}
    assert detect_cluster(bound).local_device_ids is None


def test_slurm_step_values_take_precedence():
    env = {**SLURM, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "JAX_COORDINATOR_PORT": "99"}
    del env["SLURM_STEP_NODELIST"]
    spec = detect_cluster(env)
    assert (spec.coordinator_address, spec.num_processes) == ("gpu017:99", 2)


def test_slurm_outside_srun_or_single_task_is_single_process():
    outside = {k: v for k, v in SLURM.items() if k != "SLURM_PROCID"}  # salloc shell, no srun
    assert detect_cluster(outside) is None
    assert detect_cluster({**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None


def test_generic_env_wins_over_slurm():
    env = {
        **SLURM,
        "JAXALIGN_COORDINATOR": "h:1",
        "JAXALIGN_NUM_PROCESSES": "2",
        "JAXALIGN_PROCESS_ID": "0",
    }
    assert detect_cluster(env).source == "env"


def test_tpu_vm_leaves_everything_to_jax():
    assert detect_cluster({}, on_tpu_vm=True) == ClusterSpec("tpu")
    assert ClusterSpec("tpu").kwargs() == {}
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "t0,t1"}) == ClusterSpec("tpu")
    # explicit values refine the TPU spec; jax fills in the rest from the metadata server
    spec = detect_cluster({}, on_tpu_vm=True, process_id=3)
    assert spec.kwargs() == {"process_id": 3}
    assert detect_cluster({}, on_tpu_vm=True, num_processes=4).kwargs() == {"num_processes": 4}


def test_explicit_arguments():
    spec = detect_cluster({}, coordinator_address="h:5", num_processes=2, process_id=1)
    assert spec == ClusterSpec("explicit", "h:5", 2, 1)
    assert spec.kwargs() == {"coordinator_address": "h:5", "num_processes": 2, "process_id": 1}
    with pytest.raises(ValueError, match=r"\['coordinator_address', 'process_id'\] not given"):
        detect_cluster({}, num_processes=2)
    # explicit overrides a detected field
    assert detect_cluster(SLURM, coordinator_address="h:5").coordinator_address == "h:5"
    assert detect_cluster({}, coordinator_address="h:5", num_processes=1, process_id=0) is None


def test_opt_out():
    assert detect_cluster({**SLURM, "JAXALIGN_DISTRIBUTED": "0"}, on_tpu_vm=True) is None


WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from jaxalign import sharding
    spec = sharding.initialize()  # from JAXALIGN_* env vars
    import jax
    import jax.numpy as jnp
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
    rules = sharding.ShardingRules.preset("fsdp")
    pid = jax.process_index()
    full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) ** 1.5
    local = full[4 * pid : 4 * pid + 4]  # this process's rows
    batch = sharding.to_global({"x": local}, mesh, rules)
    x = batch["x"]
    total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(x)
    col = jax.jit(lambda a: a.sum(0), out_shardings=sharding.replicated(mesh))(x)
    hybrid = sharding.make_mesh({"fsdp": -1}, dcn_shape={"data": -1})  # processes = granules
    rows_of = [sorted({d.process_index for d in row.flat}) for row in hybrid.devices]
    print("RESULT " + json.dumps({
        "hybrid": dict(hybrid.shape), "hybrid_rows": rows_of,
        "source": spec.source, "pid": pid, "processes": jax.process_count(),
        "devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
        "mesh": dict(mesh.shape), "global_shape": list(x.shape),
        "total": float(total), "col": np.asarray(col).tolist(),
    }), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_process_global_mesh_sum(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAXALIGN_", "TPU_"))
    }
    procs = []
    for pid in range(2):
        env = {
            **base,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "JAX_PLATFORMS": "cpu",
            "JAXALIGN_COORDINATOR": f"127.0.0.1:{port}",
            "JAXALIGN_NUM_PROCESSES": "2",
            "JAXALIGN_PROCESS_ID": str(pid),
            "PYTHONPATH": str(REPO),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=60)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("2-process jax.distributed run did not finish in 60 s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    results = [
        json.loads(line[len("RESULT ") :])
        for out in outputs
        for line in out.splitlines()
        if line.startswith("RESULT ")
    ]
    full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) ** 1.5
    assert sorted(r["pid"] for r in results) == [0, 1]
    for r in results:
        assert r["source"] == "env"
        assert (r["processes"], r["devices"], r["local_devices"]) == (2, 8, 4)
        assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
        assert r["global_shape"] == [8, 3]
        assert r["hybrid"] == {"data": 2, "fsdp": 4, "tensor": 1}
        assert r["hybrid_rows"] == [[0], [1]]  # only the data axis crosses processes
        np.testing.assert_allclose(r["total"], full.sum(), rtol=1e-6)
        np.testing.assert_allclose(r["col"], full.sum(0), rtol=1e-6)
