"""R-TSVM (`jaxalign.merge.r_tsvm`, jaxalign's documented form) against float64 NumPy written
from the formula (merge_reference.r_tsvm) on random matrices with planted outliers, values and
gradients; the documented choices (winsorising at the quantile, the energy rank rule and its cap
on known spectra, energy = quantile = 1 is TSV at the default rank, a planted outlier entry no
longer dominates); `jaxalign merge --config configs/merge/r_tsvm.py` on tiny converted
checkpoints; bad r_tsvm keys fail with one `jaxalign:` line."""

from __future__ import annotations

import itertools
import pathlib

import jax
import jax.numpy as jnp
import merge_reference as ref
import numpy as np
import pytest

from jaxalign.merge import MergeOptions, merge_tree, r_tsvm, r_tsvm_ranks, tsv

ROOT = pathlib.Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(0)
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 SVDs against float64


def _tasks(shape, n, scale=0.1, outliers=2):
    """A base and ``n`` fine-tunes of it, each task vector with ``outliers`` entries x 30."""
    base = RNG.normal(size=shape).astype(np.float32)
    xs = []
    for _ in range(n):
        tau = scale * RNG.normal(size=shape)
        flat = tau.reshape(-1)
        flat[RNG.choice(flat.size, outliers, replace=False)] *= 30.0
        xs.append((base + tau).astype(np.float32))
    return base, xs


def _spectrum_matrix(shape, sigmas):
    """A [m, n] matrix with singular values ``sigmas`` (descending) and random vectors."""
    (m, n), r = shape, len(sigmas)
    left = np.linalg.qr(RNG.normal(size=(m, r)))[0]
    right = np.linalg.qr(RNG.normal(size=(n, r)))[0]
    return (left * np.asarray(sigmas)) @ right.T


@pytest.mark.parametrize("shape", [(12, 8), (5, 9), (7,)])
@pytest.mark.parametrize(("quantile", "energy"), [(0.99, 0.9), (0.8, 0.5)])
def test_r_tsvm_matches_numpy(shape, quantile, energy):
    base, xs = _tasks(shape, 3)
    w = (0.5, 1.5, -1.0)
    got = r_tsvm(jnp.asarray(base), [jnp.asarray(x) for x in xs], w, quantile, energy, alpha=0.7)
    want = ref.r_tsvm(base, xs, w, quantile, energy, 0.7)
    np.testing.assert_allclose(np.asarray(got), want, **TOL)


def test_merge_tree_r_tsvm_matches_numpy_per_leaf():
    leaves = {name: _tasks(shape, 2) for name, shape in (("embed", (12, 8)), ("norm", (7,)))}
    base = {name: jnp.asarray(b) for name, (b, _) in leaves.items()}
    models = [{name: jnp.asarray(xs[i]) for name, (_, xs) in leaves.items()} for i in range(2)]
    options = MergeOptions(
        weights=(1.0, 0.5), densities=(1.0, 1.0), alpha=1.2, outlier_quantile=0.9, energy=0.8
    )
    got = merge_tree("r_tsvm", base, models, options)
    for name, (b, xs) in leaves.items():
        want = ref.r_tsvm(b, xs, (1.0, 0.5), 0.9, 0.8, 1.2)
        np.testing.assert_allclose(np.asarray(got[name]), want, **TOL)


def test_r_tsvm_gradient_matches_finite_differences_of_numpy():
    """Through the winsorising threshold (the quantile interpolates two entries) and the SVDs,
    at the ranks the rule picks (piecewise constant)."""
    base, xs = _tasks((6, 4), 2, scale=0.5)
    probe = RNG.normal(size=(6, 4))
    args = ((1.0, 0.8), 0.8, 0.7)

    def jax_objective(x0):
        merged = r_tsvm(jnp.asarray(base), [x0, jnp.asarray(xs[1])], *args, alpha=0.9)
        return jnp.sum(merged * probe)

    grad = np.asarray(jax.grad(jax_objective)(jnp.asarray(xs[0])))
    x0, eps, fd = np.float64(xs[0]), 1e-6, np.zeros((6, 4))
    for i in np.ndindex(x0.shape):
        step = np.zeros_like(x0)
        step[i] = eps
        up = ref.r_tsvm(base, [x0 + step, xs[1]], *args, 0.9)
        down = ref.r_tsvm(base, [x0 - step, xs[1]], *args, 0.9)
        fd[i] = np.sum((up - down) * probe) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-3)


def test_energy_and_quantile_one_is_tsv_at_the_default_rank():
    """energy = 1 keeps every triplet (k_i = r); the cap then gives 1 + floor((r - 1)(r - T) /
    (T r - T)) = floor(r / T), TSV's default; one task: TSV at full rank."""
    for n in (1, 3):
        base, xs = _tasks((12, 8), n)
        b, xs = jnp.asarray(base), [jnp.asarray(x) for x in xs]
        got = r_tsvm(b, xs, (1.0,) * n, outlier_quantile=1.0, energy=1.0, alpha=1.3)
        want = tsv(b, xs, (1.0,) * n, rank_fraction=1.0 if n == 1 else 0.0, alpha=1.3)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def test_one_task_at_full_rank_is_the_winsorised_task_matrix():
    """The documented weighting: entries with |Delta| above its quantile q become sign * q."""
    base, (x,) = _tasks((12, 8), 1, outliers=3)
    got = np.float64(r_tsvm(jnp.asarray(base), [jnp.asarray(x)], (2.0,), 0.9, 1.0)) - base
    delta = 2.0 * (np.float64(x) - base)
    q = np.quantile(np.abs(delta), 0.9)  # position 0.9 * 95 = 85.5: the mean of two entries
    assert np.sum(np.abs(delta) > q) == 10
    np.testing.assert_allclose(got, np.clip(delta, -q, q), **TOL)


def test_planted_outlier_no_longer_dominates():
    """One entry 1000x the others: TSV's top singular pair is that entry (its merged change there
    is ~10); R-TSVM clips it to the 0.98 quantile first, so the top pair is the bulk's. (At 0.99
    the quantile of these 96 entries, position 0.99 * 95 = 94.05, would interpolate 5% of the
    way to the outlier itself: q = 0.52.)"""
    base = RNG.normal(size=(12, 8)).astype(np.float32)
    delta = 0.01 * RNG.normal(size=(12, 8))
    delta[3, 5] = 10.0
    b, x = jnp.asarray(base), jnp.asarray(base + delta, jnp.float32)
    by_tsv = np.float64(tsv(b, [x], (1.0,), rank_fraction=1 / 8)) - base  # k = 1
    by_r_tsvm = np.float64(r_tsvm(b, [x], (1.0,), 0.98, 0.9)) - base
    assert by_tsv[3, 5] > 9.9 and abs(by_r_tsvm[3, 5]) < 0.05
    top = [np.abs(np.linalg.svd(d)[0][:, 0]) for d in (by_tsv, by_r_tsvm)]
    assert top[0][3] > 0.999 and top[1][3] < 0.9


def test_rank_rule_on_known_spectra():
    # squared: 9, 4, 1, 1, 0.25 (sum 15.25): 0.9 of it needs 3, 0.5 needs 1, 1.0 needs 5
    sigmas = [3.0, 2.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0]
    assert [r_tsvm_ranks(np.array([sigmas]), e) for e in (0.9, 0.5, 1.0)] == [(3,), (1,), (5,)]
    assert r_tsvm_ranks(np.zeros((1, 4)), 0.9) == (1,)  # a zero task keeps one triplet
    # caps: r = 4, T = 2; (4, 4) -> 1 + floor(3 * 2 / 6) = 2 each; (4, 1) -> (3, 1)
    flat, spike = [1.0] * 4, [1.0, 0.0, 0.0, 0.0]
    assert r_tsvm_ranks(np.array([flat, flat]), 1.0) == (2, 2)
    assert r_tsvm_ranks(np.array([flat, spike]), 1.0) == (3, 1)
    assert r_tsvm_ranks(np.array([flat, flat, spike]), 1.0) == (1, 1, 1)  # 1 + floor(3 / 6)
    assert r_tsvm_ranks(np.array([[1.0, 1.0]] * 3), 1.0) == (1, 1, 1)  # T > r: one each
    # every uncapped rank tuple up to r = 6, T = 4: within the cap, >= 1, never raised
    for r in range(1, 7):
        for t in range(1, 5):
            for ks in itertools.product(range(1, r + 1), repeat=t):
                rows = np.array([[1.0] * k + [0.0] * (r - k) for k in ks])
                capped = r_tsvm_ranks(rows, 1.0)
                assert capped == tuple(ref.r_tsvm_ranks(rows, 1.0))
                assert sum(capped) <= max(r, t)
                assert all(1 <= c <= k for c, k in zip(capped, ks, strict=True))
                assert capped == ks or sum(ks) > max(r, t)


def test_known_spectrum_keeps_the_energy_rank():
    """Singular values 3, 2, 1.2, 0.8, 0.5 (squared 9, 4, 1.44, 0.64, 0.25): energy 0.9 keeps
    the top 3 triplets (13 < 0.9 * 15.33 = 13.8 <= 14.44), 0.5 the top one."""
    base = RNG.normal(size=(12, 8))
    delta = _spectrum_matrix((12, 8), [3.0, 2.0, 1.2, 0.8, 0.5])
    b, x = jnp.asarray(base, jnp.float32), jnp.asarray(base + delta, jnp.float32)
    u, s, vt = np.linalg.svd(np.float64(x) - np.float64(b))
    for energy, k in ((0.9, 3), (0.5, 1)):
        got = np.float64(r_tsvm(b, [x], (1.0,), outlier_quantile=1.0, energy=energy)) - base
        np.testing.assert_allclose(got, (u[:, :k] * s[:k]) @ vt[:k], rtol=1e-4, atol=1e-4)
        assert np.linalg.matrix_rank(got, tol=1e-3) == k


def test_stacked_leaf_is_refused():
    base = jnp.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"r_tsvm merges .* got shape \(2, 3, 4\)"):
        r_tsvm(base, [base + 1.0], (1.0,))


def test_shipped_config_through_the_cli_matches_numpy(tmp_path, demo_merge_runs, capsys):
    """configs/merge/r_tsvm.py as shipped, on tiny converted checkpoints at its runs/demo paths."""
    from safetensors.numpy import load_file

    from jaxalign.cli import main

    tensors = demo_merge_runs
    config = str(ROOT / "configs/merge/r_tsvm.py:alpha=0.8,outlier_quantile=0.95")
    main(["merge", "--config", config, "--out", "merged"])
    assert "wrote merged" in capsys.readouterr().out
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(got) == set(tensors["sft"])
    for name, value in got.items():
        xs = [tensors["dpo"][name], tensors["grpo"][name]]
        want = ref.r_tsvm(tensors["sft"][name], xs, (1.0, 1.0), 0.95, 0.9, 0.8)
        np.testing.assert_allclose(value, want, **TOL, err_msg=name)


def test_bad_r_tsvm_keys(tmp_path, capsys):
    from jaxalign.cli import main

    cases = {
        'c.method = "r_tsvm"\nc.r_tsvm.energy = 1.5': "r_tsvm.energy 1.5 not in (0, 1]",
        'c.method = "r_tsvm"\nc.r_tsvm.energy = 0.0': "r_tsvm.energy 0.0 not in (0, 1]",
        'c.method = "r_tsvm"\nc.r_tsvm.outlier_quantile = 0.0': "r_tsvm.outlier_quantile 0.0",
        'c.method = "r_tsvm"\nc.r_tsvm.rank = 4': 'unknown key "r_tsvm.rank"',
        'c.method = "tsv"\nc.r_tsvm.alpha = 2.0': "r_tsvm.alpha is a key of method r_tsvm only",
        'c.method = "r_tsvm"\nc.tsv.alpha = 2.0': "tsv.alpha is a key of method tsv only",
        'c.method = "r_tsvm"\nc.base = ""': "method r_tsvm needs a base model",
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
