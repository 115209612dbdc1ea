"""TSV-Merge (`jaxalign.merge.tsv`) against float64 NumPy written from the formula
(merge_reference.tsv) on random matrices, values and gradients; its properties (one task at full
rank is task arithmetic with lam = alpha, one task at a fraction is its truncated SVD with the
documented rank, tasks with orthogonal row and column spaces are summed unchanged, overlapping
ones are not); `jaxalign merge --config configs/merge/tsv.py` on tiny converted checkpoints; bad
tsv keys fail with one `jaxalign:` line."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import merge_reference as ref
import numpy as np
import pytest

from jaxalign.merge import MergeOptions, merge_tree, task_arithmetic, tsv, tsv_rank

ROOT = pathlib.Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(0)
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 SVDs against float64


def _tasks(shape, n, scale=0.1):
    base = RNG.normal(size=shape).astype(np.float32)
    xs = [base + np.float32(scale) * RNG.normal(size=shape).astype(np.float32) for _ in range(n)]
    return base, xs


@pytest.mark.parametrize("shape", [(12, 8), (5, 9), (7,)])
@pytest.mark.parametrize("rank_fraction", [0.0, 0.5, 1.0])
def test_tsv_matches_numpy(shape, rank_fraction):
    base, xs = _tasks(shape, 3)
    w = (0.5, 1.5, -1.0)
    got = tsv(jnp.asarray(base), [jnp.asarray(x) for x in xs], w, rank_fraction, alpha=0.7)
    want = ref.tsv(base, xs, w, rank_fraction, 0.7)
    np.testing.assert_allclose(np.asarray(got), want, **TOL)


def test_merge_tree_tsv_matches_numpy_per_leaf():
    leaves = {name: _tasks(shape, 2) for name, shape in (("embed", (16, 16)), ("norm", (16,)))}
    base = {name: jnp.asarray(b) for name, (b, _) in leaves.items()}
    models = [{name: jnp.asarray(xs[i]) for name, (_, xs) in leaves.items()} for i in range(2)]
    options = MergeOptions(weights=(1.0, 0.5), densities=(1.0, 1.0), alpha=1.2)
    got = merge_tree("tsv", base, models, options)
    for name, (b, xs) in leaves.items():
        want = ref.tsv(b, xs, (1.0, 0.5), 0.0, 1.2)
        np.testing.assert_allclose(np.asarray(got[name]), want, **TOL)


def test_tsv_gradient_matches_finite_differences_of_numpy():
    base, xs = _tasks((6, 4), 2, scale=0.5)
    probe = RNG.normal(size=(6, 4))

    def jax_objective(x0):
        merged = tsv(jnp.asarray(base), [x0, jnp.asarray(xs[1])], (1.0, 0.8), 0.5, alpha=0.9)
        return jnp.sum(merged * probe)

    grad = np.asarray(jax.grad(jax_objective)(jnp.asarray(xs[0])))
    x0, eps, fd = np.float64(xs[0]), 1e-6, np.zeros((6, 4))
    for i in np.ndindex(x0.shape):
        step = np.zeros_like(x0)
        step[i] = eps
        up = ref.tsv(base, [x0 + step, xs[1]], (1.0, 0.8), 0.5, 0.9)
        down = ref.tsv(base, [x0 - step, xs[1]], (1.0, 0.8), 0.5, 0.9)
        fd[i] = np.sum((up - down) * probe) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-3)


def test_one_task_full_rank_is_task_arithmetic_with_lam_alpha():
    for shape in ((12, 8), (7,)):
        base, (x,) = _tasks(shape, 1)
        got = tsv(jnp.asarray(base), [jnp.asarray(x)], (1.0,), 1.0, alpha=1.7)
        want = task_arithmetic(jnp.asarray(base), [jnp.asarray(x)], (1.0,), lam=1.7)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def test_one_task_at_a_fraction_is_its_truncated_svd_rank_floor():
    base, (x,) = _tasks((12, 8), 1)
    got = np.float64(tsv(jnp.asarray(base), [jnp.asarray(x)], (1.0,), 0.3)) - base
    u, s, vt = np.linalg.svd(np.float64(x) - base)
    k = 2  # floor(0.3 * 8)
    np.testing.assert_allclose(got, (u[:, :k] * s[:k]) @ vt[:k], **TOL)
    assert np.linalg.matrix_rank(got, tol=1e-3 * s[0]) == k
    assert [tsv_rank(100, 1, 0.29), tsv_rank(8, 3), tsv_rank(2, 5), tsv_rank(9, 2, 1.0)] == [
        29, 2, 1, 9,
    ]  # fmt: skip


def test_default_rank_is_min_dim_over_tasks():
    base, xs = _tasks((12, 8), 3)  # k = floor(8 / 3) = 2 per task: rank 6
    got = np.float64(tsv(jnp.asarray(base), [jnp.asarray(x) for x in xs], (1.0,) * 3)) - base
    s = np.linalg.svd(got, compute_uv=False)
    assert s[5] > 1e-3 * s[0] and s[6] < 1e-5 * s[0]


def test_orthogonal_tasks_are_summed_unchanged_and_overlapping_ones_are_not():
    (m, n), r = (12, 8), 2
    left = np.linalg.qr(RNG.normal(size=(m, m)))[0]
    right = np.linalg.qr(RNG.normal(size=(n, n)))[0]
    base = RNG.normal(size=(m, n)).astype(np.float32)
    deltas = [
        (left[:, i * r : (i + 1) * r] * RNG.uniform(0.5, 2.0, r)) @ right[:, i * r : (i + 1) * r].T
        for i in range(3)
    ]  # rank 2 each, disjoint column and row spaces; default k = floor(8 / 3) = 2
    xs = [jnp.asarray(base + d, jnp.float32) for d in deltas]
    got = tsv(jnp.asarray(base), xs, (1.0,) * 3, alpha=0.6)
    np.testing.assert_allclose(np.asarray(got), base + 0.6 * sum(deltas), **TOL)

    base, overlapping = _tasks((m, n), 3)
    got = tsv(jnp.asarray(base), [jnp.asarray(x) for x in overlapping], (1.0,) * 3, 1.0)
    summed = task_arithmetic(jnp.asarray(base), [jnp.asarray(x) for x in overlapping], (1.0,) * 3)
    assert np.max(np.abs(np.asarray(got) - np.asarray(summed))) > 1e-2


def test_stacked_leaf_is_refused():
    base = jnp.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 4\)"):
        tsv(base, [base + 1.0], (1.0,))


def test_shipped_config_through_the_cli_matches_numpy(tmp_path, demo_merge_runs, capsys):
    """configs/merge/tsv.py as shipped, on tiny converted checkpoints at its runs/demo paths."""
    from safetensors.numpy import load_file

    from jaxalign.cli import main

    tensors = demo_merge_runs
    main(["merge", "--config", str(ROOT / "configs/merge/tsv.py:alpha=0.8"), "--out", "merged"])
    assert "wrote merged" in capsys.readouterr().out
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(got) == set(tensors["sft"])
    for name, value in got.items():
        xs = [tensors["dpo"][name], tensors["grpo"][name]]
        want = ref.tsv(tensors["sft"][name], xs, (1.0, 1.0), 0.0, 0.8)
        np.testing.assert_allclose(value, want, **TOL, err_msg=name)


def test_bad_tsv_keys(tmp_path, capsys):
    from jaxalign.cli import main

    cases = {
        'c.method = "tsv"\nc.tsv.rank_fraction = 1.5': "tsv.rank_fraction 1.5 not in (0, 1]",
        'c.method = "tsv"\nc.tsv.rank = 4': 'unknown key "tsv.rank"',
        'c.method = "ties"\nc.tsv.alpha = 2.0': "tsv.alpha is a key of method tsv only",
        'c.method = "tsv"\nc.base = ""': "method tsv needs a base model",
    }
    for body, message in cases.items():
        file = tmp_path / "cfg.py"
        file.write_text(
            "from jaxalign.merge.driver import merge_config\n\n\ndef get_config(arg=None):\n"
            '    c = merge_config()\n    c.base = "hf:b"\n    c.models = ({"model": "hf:m"},)\n'
            + "".join(f"    {line}\n" for line in body.splitlines())
            + "    return c\n"
        )
        with pytest.raises(SystemExit) as e:
            main(["merge", "--config", str(file), "--out", str(tmp_path / "x")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("jaxalign: ") and "\n" not in err and message in err, err
