"""Merge methods against float64 NumPy written from the formulas, on random params trees, and
their properties: one model gives it back, TIES at density 1 with agreeing signs is task
arithmetic, DARE is seeded, SLERP hits its endpoints and falls back to linear, restore-alignment
restores what its rule chooses (nothing: the fine-tuned model; everything: the aligned one)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import merge_reference as ref
import numpy as np
import pytest

from jaxalign.merge import (
    MergeOptions,
    RestoreRule,
    dare_key,
    linear,
    merge_tensor,
    merge_tree,
    relative_change,
    restore,
    slerp,
    task_arithmetic,
    trim,
)

RNG = np.random.default_rng(0)
SHAPES = {"embed": (7, 5), "layers": {"kernel": (2, 3, 4), "scale": (6,)}}
W, D = (0.5, 1.5, 1.0), (0.3, 0.6, 0.9)
TOL = dict(rtol=1e-5, atol=1e-6)


def _tree(scale=1.0):
    return jax.tree.map(
        lambda s: jnp.asarray(scale * RNG.normal(size=s), jnp.float32),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _names(tree):
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(k.key for k in path) for path, _ in paths]


BASE = _tree()
MODELS = [jax.tree.map(lambda b: b + 0.1 * RNG.normal(size=b.shape), BASE) for _ in W]


def _reference(method, options, base, models):
    names = _names(base)
    b_leaves = [np.asarray(x) for x in jax.tree.leaves(base)]
    m_leaves = [[np.asarray(x) for x in jax.tree.leaves(m)] for m in models]
    out = []
    for j, name in enumerate(names):
        b, xs = b_leaves[j], [ls[j] for ls in m_leaves]
        w, d, lam = options.weights, options.densities, options.lam
        if method == "linear":
            out.append(ref.linear(xs, w, options.normalize))
        elif method == "task_arithmetic":
            out.append(ref.task_arithmetic(b, xs, w, lam))
        elif method == "ties":
            out.append(ref.ties(b, xs, w, d, lam))
        elif method in ("dare", "dare_ties"):
            masks = [
                np.asarray(jax.random.bernoulli(dare_key(options.seed, name, i), di, b.shape))
                for i, di in enumerate(d)
            ]
            out.append(ref.dare(b, xs, w, d, masks, lam, elect=method == "dare_ties"))
        else:
            out.append(ref.slerp(b, xs[0], options.t))
    return out


@pytest.mark.parametrize(
    "method", ["linear", "task_arithmetic", "ties", "dare", "dare_ties", "slerp"]
)
@pytest.mark.parametrize("normalize", [True, False])
def test_methods_match_numpy_on_random_trees(method, normalize):
    models = MODELS[:1] if method == "slerp" else MODELS
    options = MergeOptions(weights=W, densities=D, lam=0.7, t=0.3, normalize=normalize, seed=3)
    got = merge_tree(method, None if method == "linear" else BASE, models, options)
    want = _reference(method, options, BASE, models)
    for g, w in zip(jax.tree.leaves(got), want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, **TOL)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare", "dare_ties"])
def test_one_model_gives_it_back(method):
    options = MergeOptions(weights=(1.0,), densities=(1.0,))
    got = merge_tree(method, BASE, MODELS[:1], options)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(MODELS[0]), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)


def test_ties_density_one_agreeing_signs_is_task_arithmetic():
    base = BASE["embed"]
    direction = jnp.sign(jnp.asarray(RNG.normal(size=base.shape), jnp.float32))
    xs = [base + direction * jnp.asarray(RNG.uniform(0.1, 1, base.shape), jnp.float32) for _ in W]
    options = MergeOptions(weights=W, densities=(1.0,) * 3, lam=0.8)
    got = merge_tensor("ties", "embed", base, xs, options)
    total = sum(W)
    want = task_arithmetic(base, xs, [w / total for w in W], 0.8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.5, 0.77, 1.0])
def test_trim_keeps_the_largest_with_ties_in_index_order(density):
    # Magnitudes from a handful of values (many ties, both signs, zeros) and random floats.
    tied = RNG.integers(-3, 4, size=(13, 11)).astype(np.float32) * np.float32(0.25)
    spread = RNG.normal(size=(9, 7)).astype(np.float32) * np.float32(1e-3)
    for tau in (tied, spread, np.concatenate([tied.ravel(), spread.ravel()])):
        got = np.asarray(trim(jnp.asarray(tau), density))
        np.testing.assert_array_equal(got, ref.trim(tau, density))
        assert np.count_nonzero(got) <= round(density * tau.size)


def test_dare_is_seeded_and_unbiased():
    base, x = BASE["embed"], MODELS[0]["embed"]
    options = MergeOptions(weights=(1.0,), densities=(0.4,), seed=1)
    a = merge_tensor("dare", "embed", base, [x], options)
    b = merge_tensor("dare", "embed", base, [x], options)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = merge_tensor("dare", "embed", base, [x], MergeOptions((1.0,), (0.4,), seed=2))
    assert not np.array_equal(np.asarray(a), np.asarray(other))
    renamed = merge_tensor("dare", "other", base, [x], options)
    assert not np.array_equal(np.asarray(a), np.asarray(renamed))
    tau = np.float64(x) - np.float64(base)
    kept = np.float64(a) - np.float64(base)
    survivors = kept != 0
    np.testing.assert_allclose(kept[survivors], tau[survivors] / 0.4, rtol=1e-5)
    # Over many seeds the mean of the rescaled task vector is the task vector.
    mean = np.mean(
        [
            np.float64(
                merge_tensor("dare", "embed", base, [x], MergeOptions((1.0,), (0.4,), 1.0, seed=s))
            )
            - np.float64(base)
            for s in range(400)
        ],
        axis=0,
    )
    assert np.abs(mean - tau).max() < 6 * np.abs(tau).max() * np.sqrt(0.6 / 0.4 / 400)


def test_slerp_endpoints_and_linear_fallback():
    a, b = BASE["embed"], MODELS[0]["embed"]
    np.testing.assert_allclose(np.asarray(slerp(a, b, 0.0)), np.asarray(a), **TOL)
    np.testing.assert_allclose(np.asarray(slerp(a, b, 1.0)), np.asarray(b), **TOL)
    for other in (2.0 * a, -3.0 * a):  # parallel, antiparallel: (1 - t) a + t b
        np.testing.assert_allclose(
            np.asarray(slerp(a, other, 0.25)),
            0.75 * np.asarray(a) + 0.25 * np.asarray(other),
            **TOL,
        )
    # Orthogonal unit vectors stay on the unit circle.
    e1, e2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
    mid = np.asarray(slerp(e1, e2, 0.5))
    np.testing.assert_allclose(mid, [np.sqrt(0.5), np.sqrt(0.5)], **TOL)


def _fd_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for j in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[j] = eps
        g[j] = (f(x + e) - f(x - e)) / (2 * eps)
    return g


def test_gradients_match_numpy_finite_differences():
    a, b = np.float64(BASE["layers"]["scale"]), np.float64(MODELS[0]["layers"]["scale"])
    c = RNG.normal(size=a.shape)
    got = jax.grad(lambda x: jnp.sum(slerp(x, jnp.asarray(b, jnp.float32), 0.3) * c))(
        jnp.asarray(a, jnp.float32)
    )
    want = _fd_grad(lambda x: np.sum(ref.slerp(x, b, 0.3) * c), a)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-4)
    xs = [jnp.asarray(np.float64(m["layers"]["scale"]), jnp.float32) for m in MODELS]
    got = jax.grad(lambda x0: jnp.sum(linear([x0, *xs[1:]], W) * c))(xs[0])
    want = _fd_grad(
        lambda x0: np.sum(ref.linear([x0, *map(np.float64, xs[1:])], W) * c), np.float64(xs[0])
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    got = jax.grad(lambda b0: jnp.sum(task_arithmetic(b0, xs, W, 0.7) * c))(
        jnp.asarray(a, jnp.float32)
    )
    want = _fd_grad(lambda b0: np.sum(ref.task_arithmetic(b0, xs, W, 0.7) * c), a)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


# A fine-tuned tree whose leaves moved by different relative amounts (embed 0.5, kernel 0.05,
# scale 0.2 of their norms, roughly), so the largest-change ranking is not the leaf order.
TUNED = {
    "embed": BASE["embed"] * (1 + 0.5 * RNG.normal(size=(7, 5))),
    "layers": {
        "kernel": BASE["layers"]["kernel"] * (1 + 0.05 * RNG.normal(size=(2, 3, 4))),
        "scale": BASE["layers"]["scale"] * (1 + 0.2 * RNG.normal(size=6)),
    },
}


@pytest.mark.parametrize(
    "rule",
    [
        dict(pattern="layers/"),
        dict(pattern="^embed$|scale"),
        dict(top_k=1),
        dict(top_k=2),
        dict(fraction=0.5),  # embed (35 of 65 entries) alone is >= half
        dict(fraction=0.6),  # embed + scale (41 of 65)
        dict(fraction=1.0),
    ],
)
def test_restore_matches_numpy(rule):
    got, names = restore(BASE, TUNED, RestoreRule(**rule))
    b_leaves = [np.asarray(x) for x in jax.tree.leaves(BASE)]
    x_leaves = [np.asarray(x) for x in jax.tree.leaves(TUNED)]
    want_names, want = ref.restore(b_leaves, x_leaves, _names(BASE), **rule)
    assert names == want_names
    for g, w in zip(jax.tree.leaves(got), want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.float32(w))


def test_restore_ranking_and_fraction_boundary():
    # Relative changes: embed ~0.5 > scale ~0.2 > kernel ~0.05.
    assert restore(BASE, TUNED, RestoreRule(top_k=2))[1] == ["embed", "layers/scale"]
    # Exactly embed's share of the entries: embed alone; one entry more: the next one too.
    assert restore(BASE, TUNED, RestoreRule(fraction=35 / 65))[1] == ["embed"]
    assert restore(BASE, TUNED, RestoreRule(fraction=36 / 65))[1] == ["embed", "layers/scale"]


def test_restore_nothing_is_the_finetuned_model_everything_the_aligned():
    for rule, want in (
        (RestoreRule(pattern="no-such-tensor"), TUNED),
        (RestoreRule(pattern="."), BASE),
        (RestoreRule(top_k=10), BASE),
        (RestoreRule(fraction=1.0), BASE),
    ):
        got, names = restore(BASE, TUNED, rule)
        assert len(names) == (0 if want is TUNED else 3)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w, np.float32))


def test_relative_change():
    b, x = np.array([3.0, 4.0]), np.array([3.0, 5.0])
    assert relative_change(b, x) == pytest.approx(1 / 5)
    assert relative_change(np.zeros(2), x) == np.inf
    assert relative_change(np.zeros(2), np.zeros(2)) == 0.0
