"""One decoding step against float64 NumPy written from the definitions (Hugging Face's warper
code for top-p, the CTRL/OpenAI rules for the penalties), and the sampler's distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.sampling import token_choice as tc

R, V = 6, 300  # V not a multiple of the sampler's 128-token block


def _logits(seed, scale=3.0):
    return np.random.default_rng(seed).normal(0, scale, (R, V)).astype(np.float32)


def np_penalties(z, prompt_seen, completion_seen, r, a):
    z = z.astype(np.float64)
    penalised = np.where(z > 0, z / r, z * r)
    return np.where(prompt_seen | completion_seen, penalised, z) - a * completion_seen


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_keep(z, top_k, top_p, min_p):
    """Kept tokens, following transformers' TopK, TopP and MinP warpers literally."""
    z = z.astype(np.float64)
    keep = np.ones(z.shape, bool)
    if top_k > 0:
        kth = np.sort(z, axis=-1)[:, -min(top_k, z.shape[-1])][:, None]  # HF clips k to V
        keep &= z >= kth
    masked = np.where(keep, z, -np.inf)
    if top_p < 1:
        order = np.argsort(masked, axis=-1)  # ascending, like TopPLogitsWarper
        probs = np_softmax(np.take_along_axis(masked, order, -1))
        remove_sorted = np.cumsum(probs, -1) <= 1 - top_p
        remove_sorted[:, -1] = False  # min_tokens_to_keep = 1
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, -1)
        keep &= ~remove
    masked = np.where(keep, z, -np.inf)
    probs = np_softmax(masked)
    keep &= probs >= min_p * probs.max(-1, keepdims=True)
    return keep


def test_sortable_keys_order_like_floats():
    x = np.concatenate(
        [
            np.random.default_rng(0).normal(0, 10, 1000),
            [0.0, -0.0, np.inf, -np.inf, 1e-38, -1e-38, 3e38, -3e38],
        ]
    ).astype(np.float32)
    keys = np.asarray(tc.sortable_keys(jnp.asarray(x))).astype(np.int64)
    i, j = np.triu_indices(len(x), 1)
    both_zero = (x[i] == 0) & (x[j] == 0)
    order = lambda a, b: (a > b).astype(int) - (a < b).astype(int)  # noqa: E731
    assert np.array_equal(order(keys[i], keys[j])[~both_zero], order(x[i], x[j])[~both_zero])


@pytest.mark.parametrize("r,a", [(1.3, 0.0), (0.7, 0.5), (1.0, -1.0), (2.0, 1.5)])
def test_penalties_match_numpy(r, a):
    rng = np.random.default_rng(1)
    z = _logits(1)
    prompt_seen, completion_seen = rng.random((R, V)) < 0.1, rng.random((R, V)) < 0.1
    got = tc.apply_penalties(
        jnp.asarray(z), prompt_seen, completion_seen, jnp.float32(r), jnp.float32(a)
    )
    want = np_penalties(z, prompt_seen, completion_seen, r, a)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "top_k,top_p,min_p",
    [(0, 1.0, 0.0), (1, 1.0, 0.0), (7, 1.0, 0.0), (0, 0.5, 0.0), (0, 0.95, 0.0), (20, 0.8, 0.0),
     (0, 1.0, 0.05), (50, 0.9, 0.1), (V + 5, 0.3, 0.0), (0, 1e-6, 0.0)],
)  # fmt: skip
def test_truncation_matches_transformers_warpers(top_k, top_p, min_p):
    for seed in range(4):
        z = _logits(10 + seed) / 0.7
        keep = tc.top_k_top_p_mask(jnp.asarray(z), jnp.int32(top_k), jnp.float32(top_p))
        keep = np.asarray(keep & tc.min_p_mask(jnp.asarray(z), jnp.float32(min_p)))
        np.testing.assert_array_equal(keep, np_keep(z, top_k, top_p, min_p))


def test_truncation_keeps_ties_with_the_last_kept_value():
    z = np.array([[3.0, 1.0, 3.0, 2.0, 1.0, 0.0]], np.float32)
    keep = tc.top_k_top_p_mask(jnp.asarray(z), jnp.int32(1), jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(keep), [[True, False, True, False, False, False]])
    keep = tc.top_k_top_p_mask(jnp.asarray(z), jnp.int32(3), jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(keep), [[True, False, True, True, False, False]])


def test_first_argmax_lowest_index_among_ties():
    z = _logits(3)
    z[0, [5, 9]] = 100.0
    got = np.asarray(tc.first_argmax(jnp.asarray(z)))
    np.testing.assert_array_equal(got, np.argmax(z, -1))
    assert got[0] == 5


def test_sampler_distribution_and_excluded_tokens():
    """Frequencies of 60000 draws from one row within 5 standard errors of softmax; -inf tokens
    (including a whole excluded 128-block) are never drawn."""
    rows, vocab = 60000, 300
    z = np.random.default_rng(4).normal(0, 1.5, vocab).astype(np.float32)
    z[[3, 17, 299]] = -np.inf
    z[128:256] = -np.inf
    logits = jnp.broadcast_to(jnp.asarray(z), (rows, vocab))
    draws = tc.sample_categorical(jax.random.key(0), logits)
    counts = np.bincount(np.asarray(draws), minlength=vocab)
    p = np_softmax(z.astype(np.float64)[None])[0]
    assert counts[~np.isfinite(z)].sum() == 0
    err = np.abs(counts / rows - p) / np.sqrt(p * (1 - p) / rows + 1e-12)
    assert err.max() < 5.0, err.max()


def _knobs(**kw):
    base = dict(
        temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0
    )
    base |= kw
    return {k: jnp.int32(v) if k == "top_k" else jnp.float32(v) for k, v in base.items()}


def test_choose_tokens_greedy_is_argmax_of_penalised_logits():
    rng = np.random.default_rng(5)
    z = _logits(5)
    prompt_seen, completion_seen = rng.random((R, V)) < 0.2, rng.random((R, V)) < 0.2
    for r, a in [(1.0, 0.0), (1.5, 0.0), (1.0, 2.0), (3.0, 1.0)]:
        got = tc.choose_tokens(
            jax.random.key(0),
            jnp.asarray(z),
            prompt_seen,
            completion_seen,
            _knobs(temperature=0.0, repetition_penalty=r, presence_penalty=a),
        )
        want = np.argmax(np_penalties(z, prompt_seen, completion_seen, r, a), -1)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_choose_tokens_samples_only_kept_tokens():
    """With top-k 5, top-p 0.6, min-p 0.1 and penalties at T = 0.8, every draw of 4000 per row is
    in the NumPy kept set, and most kept tokens are drawn."""
    rng = np.random.default_rng(6)
    z = _logits(6, scale=1.0)
    prompt_seen, completion_seen = rng.random((R, V)) < 0.2, rng.random((R, V)) < 0.2
    knobs = _knobs(temperature=0.8, top_k=5, top_p=0.6, min_p=0.1, repetition_penalty=1.3,
                   presence_penalty=0.5)  # fmt: skip
    want = np_keep(np_penalties(z, prompt_seen, completion_seen, 1.3, 0.5) / 0.8, 5, 0.6, 0.1)
    keys = jax.random.split(jax.random.key(1), 4000)
    draws = jax.vmap(lambda k: tc.choose_tokens(k, jnp.asarray(z), prompt_seen, completion_seen,
                                                knobs))(keys)  # fmt: skip
    draws = np.asarray(draws)  # [4000, R]
    for i in range(R):
        drawn = set(np.unique(draws[:, i]).tolist())
        kept = set(np.flatnonzero(want[i]).tolist())
        assert drawn <= kept, (i, drawn - kept)
        assert len(drawn) >= len(kept) - 1
