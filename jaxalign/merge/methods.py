"""Weight-space merges: pure functions on single tensors, and `merge_tree` over params trees.

Every method maps a base tensor ``b`` and model tensors ``x_i`` (same shape) to one tensor,
computed in float32. Task vectors are ``tau_i = x_i - b``.

- ``linear`` (model soup; Wortsman et al. 2022, "Model soups"): ``sum_i w_i x_i / sum_i w_i``
  (``normalize``), or ``sum_i w_i x_i``. The base takes no part.
- ``task_arithmetic`` (Ilharco et al. 2023, "Editing models with task arithmetic"):
  ``b + lam * sum_i w_i tau_i``.
- ``ties`` (Yadav et al. 2023, "TIES-Merging"): trim each ``tau_i`` to its ``round(density_i *
  n)`` largest entries by magnitude (``hat tau_i``, n = tensor size), elect the sign ``s =
  sign(sum_i w_i hat tau_i)``, take the disjoint weighted mean of the entries that agree,
  ``m = sum_i [sign(hat tau_i) = s] w_i hat tau_i / sum_i [sign(hat tau_i) = s] w_i`` (0 where none
  agrees), and return ``b + lam * m``. Equal weights give the paper's disjoint mean; with density
  1 and signs that agree, ``m = sum_i w_i tau_i / sum_i w_i`` (task arithmetic with normalised
  weights).
- ``dare`` (Yu et al. 2024, "Language models are super Mario"): drop each entry of ``tau_i``
  with probability ``1 - density_i`` and rescale the survivors by ``1 / density_i``, ``tilde tau_i
  = m_i * tau_i / density_i`` with ``m_i ~ Bernoulli(density_i)``, so ``E[tilde tau_i] = tau_i``;
  then ``b + lam * sum_i w_i tilde tau_i``. (mergekit instead rescales so the L1 norm of the
  kept entries matches the original's; here the paper's ``1 / density``.) The mask of model i
  on a tensor is ``jax.random.bernoulli(dare_key(seed, name, i), density_i, shape)``: the same
  seed and tensor name give the same merge.
- ``dare_ties``: DARE's drop and rescale in place of TIES' trim, then TIES' sign election and
  disjoint mean.
- ``slerp`` (Shoemake 1985; as in mergekit): one model against the base, each tensor flattened
  to a vector: with ``cos O = <b, x> / (|b| |x|)``, ``sin(O (1 - t)) / sin O * b + sin(O t) /
  sin O * x``; linear ``(1 - t) b + t x`` where ``|cos O| > 0.9995`` ((anti)parallel vectors,
  where the formula is 0 / 0).
- ``restore`` (restore-alignment): the one fine-tuned model ``x`` with a chosen set of tensors
  reset to the aligned model's (the base's) values: ``b`` where chosen, ``x`` elsewhere. A
  `RestoreRule` chooses either by ``pattern`` (a regex searched, ``re.search``, in the tensor's
  name) or by the relative change ``c = |x - b| / |b|`` (Frobenius norms; ``c = inf`` where
  ``|b| = 0`` and ``x != b``, 0 where both are 0): ``top_k`` restores the k tensors of largest
  ``c``, ``fraction`` the fewest tensors of largest ``c`` whose sizes (entries) add up to at
  least ``fraction`` of all the model's entries. Equal ``c`` keep the names' order.
- ``tsv`` (TSV-Merge; Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference
  in Model Merging"): per 2-D tensor [m, n], each task matrix ``Delta_i = w_i tau_i`` keeps its
  ``k`` top singular triplets, ``Delta_i ~ U_i S_i V_i^T`` (``k = max(1, floor(rank_fraction *
  min(m, n)))``, ``rank_fraction`` 0 = ``1 / n_models``, so the kept ranks add up to at most
  ``min(m, n)``); the kept vectors are concatenated across tasks, ``U = [U_1 .. U_T]`` [m, T k],
  ``V = [V_1 .. V_T]`` [n, T k], and decorrelated by their nearest orthonormal factors (polar
  factors: ``U = P Sigma Q^T`` gives ``U_perp = P Q^T``; the same for ``V``); the result is ``b +
  alpha * U_perp diag(S_1 .. S_T) V_perp^T``. 1-D tensors (norms, biases) fall back to task
  arithmetic on the mean task vector, ``b + alpha * sum_i w_i tau_i / T`` (as the paper's code
  averages them). With one task at full rank ``U_perp = U``: task arithmetic with ``lam = alpha``;
  tasks with mutually orthogonal row and column spaces are summed unchanged. Cost per [m, n]
  tensor (r = min(m, n)): T float32 SVDs of [m, n] plus two of [m, T k] and [T k, n], each
  ``O(m n r)``, against task arithmetic's ``O(T m n)``; it holds about ``2 T + 3`` [m, n]
  float32 matrices at once.
- ``r_tsvm`` (R-TSVM; Yang et al. 2025, "Mix Data or Merge Models? Balancing the Helpfulness,
  Honesty, and Harmlessness of Large Language Model via Model Merging", arXiv 2502.06876, RESM
  in its v3): TSV-Merge with two additions, in jaxalign's documented form (the paper's formulas
  are not available here). (1) Outlier-aware weighting, as winsorising: in each task matrix
  ``Delta_i = w_i tau_i`` the entries with ``|Delta_i| > q_i``, ``q_i`` the
  ``outlier_quantile`` quantile of the entries' ``|Delta_i|`` (linear interpolation, NumPy's
  default), are set to ``sign(Delta_i) q_i``, so a few outlier entries cannot take over the top
  singular vectors (``outlier_quantile = 1``: nothing changes). (2) Sparsity-adaptive rank: the
  winsorised ``Delta_i = U_i S_i V_i^T`` keeps its ``k_i`` top triplets, ``k_i`` the smallest k
  with ``sum_{j <= k} s_ij^2 >= energy * sum_j s_ij^2``; when ``K = sum_i k_i`` exceeds ``r =
  min(m, n)`` (and ``T``) the ranks are scaled down proportionally beyond each task's first
  triplet, ``k_i <- 1 + floor((k_i - 1) max(r - T, 0) / (K - T))`` (integer floor, so ``sum_i
  k_i <= r``; more tasks than ``r``: one triplet each, as in TSV). Then TSV's decorrelation
  and ``b + alpha U_perp diag(S) V_perp^T``; 1-D tensors as in TSV (no winsorising). With
  ``outlier_quantile = energy = 1`` it is TSV at its default rank ``floor(r / T)`` (one task:
  task arithmetic with ``lam = alpha``).
  The ranks are chosen on the host from the singular values (`r_tsvm_ranks`), so ``r_tsvm``
  runs eagerly (differentiable at fixed ranks, not jittable); cost: TSV's plus a sort of each
  task matrix, and one compiled program per matrix shape and rank tuple.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

METHODS = ("linear", "task_arithmetic", "ties", "dare", "dare_ties", "slerp", "tsv", "r_tsvm")
SLERP_DOT_THRESHOLD = 0.9995


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """Per-model ``weights`` and ``densities`` (one per model), global ``lam``, SLERP's ``t``,
    ``normalize`` (linear: divide by the sum of weights), ``seed`` (DARE's masks), TSV's
    ``rank_fraction`` (0 = 1 / number of models) and ``alpha`` (TSV's and R-TSVM's), R-TSVM's
    ``outlier_quantile`` and ``energy``."""

    weights: tuple[float, ...]
    densities: tuple[float, ...]
    lam: float = 1.0
    t: float = 0.5
    normalize: bool = True
    seed: int = 0
    rank_fraction: float = 0.0
    alpha: float = 1.0
    outlier_quantile: float = 0.99
    energy: float = 0.9


@dataclasses.dataclass(frozen=True)
class RestoreRule:
    """Which tensors ``restore`` resets to the base: exactly one of ``pattern`` (a regex searched
    in the name), ``top_k`` (the k of largest relative change) or ``fraction`` (in (0, 1]: the
    largest-change tensors holding that fraction of the entries); see the module doc."""

    pattern: str = ""
    top_k: int = 0
    fraction: float = 0.0


def linear(
    xs: Sequence[Float[Array, "..."]], weights: Sequence[float], normalize: bool = True
) -> Float[Array, "..."]:
    """Weighted average ``sum_i w_i x_i / sum_i w_i`` (``normalize``) or weighted sum."""
    total = sum(w * x.astype(jnp.float32) for w, x in zip(weights, xs, strict=True))
    return total / sum(weights) if normalize else total


def task_arithmetic(
    base: Float[Array, "..."],
    xs: Sequence[Float[Array, "..."]],
    weights: Sequence[float],
    lam: float = 1.0,
) -> Float[Array, "..."]:
    """``b + lam * sum_i w_i (x_i - b)``."""
    b = base.astype(jnp.float32)
    return b + lam * sum(w * (x.astype(jnp.float32) - b) for w, x in zip(weights, xs, strict=True))


def trim(tau: Float[Array, "..."], density: float) -> Float[Array, "..."]:
    """``tau`` with all but its ``k = round(density * n)`` largest-magnitude entries set to 0
    (equal magnitudes: the lower flat index first, as a stable sort would keep them)."""
    k = round(density * tau.size)
    flat = tau.reshape(-1)
    return jnp.where(_top_k_mask(jnp.abs(flat).astype(jnp.float32), k), flat, 0.0).reshape(
        tau.shape
    )


@jax.jit
def _top_k_mask(magnitude: Float[Array, " n"], k: int) -> Bool[Array, " n"]:
    """The k largest of non-negative ``magnitude`` (ties: lower index first), without a sort:
    the k-th largest value ``T`` is found by bisection on the int32 bit patterns (monotone in
    the value for non-negative floats), 31 counting passes; then the entries above ``T`` are
    kept, and of those equal to ``T`` the first ``k - #{magnitude > T}``."""
    bits = jax.lax.bitcast_convert_type(magnitude, jnp.int32)

    def halve(_, bounds):  # invariant: #{bits >= lo} >= k > #{bits >= hi} (for k >= 1)
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits >= mid) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    above_inf = jnp.int32(0x7F800001)
    threshold, _ = jax.lax.fori_loop(0, 31, halve, (jnp.int32(0), above_inf))
    at = bits == threshold
    room = k - jnp.sum(bits > threshold)
    keep = (bits > threshold) | (at & (jnp.cumsum(at) <= room))
    return keep & (k > 0)


def dare_key(seed: int, name: str, i: int) -> jax.Array:
    """The PRNG key of model ``i``'s DARE mask on tensor ``name`` (crc32 of the name)."""
    return jax.random.fold_in(
        jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode())), i
    )


def drop(tau: Float[Array, "..."], density: float, key: jax.Array) -> Float[Array, "..."]:
    """DARE: ``m * tau / density``, ``m ~ Bernoulli(density)`` per entry."""
    keep = jax.random.bernoulli(key, density, tau.shape)
    return jnp.where(keep, tau / density, 0.0)


def disjoint_mean(
    taus: Sequence[Float[Array, "..."]], weights: Sequence[float]
) -> Float[Array, "..."]:
    """TIES' elect + disjoint merge: ``s = sign(sum_i w_i tau_i)``, then the weighted mean of
    the entries whose sign is ``s`` (0 where none is)."""
    sign = jnp.sign(sum(w * t for w, t in zip(weights, taus, strict=True)))
    agree = [(jnp.sign(t) == sign) & (t != 0) for t in taus]
    num = sum(jnp.where(a, w * t, 0.0) for a, w, t in zip(agree, weights, taus, strict=True))
    den = sum(jnp.where(a, w, 0.0) for a, w in zip(agree, weights, strict=True))
    return jnp.where(den != 0, num / jnp.where(den != 0, den, 1.0), 0.0)


def ties(
    base: Float[Array, "..."],
    xs: Sequence[Float[Array, "..."]],
    weights: Sequence[float],
    densities: Sequence[float],
    lam: float = 1.0,
) -> Float[Array, "..."]:
    """TIES: trim each task vector to its top ``density`` fraction, elect, disjoint mean, lam."""
    b = base.astype(jnp.float32)
    taus = [trim(x.astype(jnp.float32) - b, d) for x, d in zip(xs, densities, strict=True)]
    return b + lam * disjoint_mean(taus, weights)


def dare(
    base: Float[Array, "..."],
    xs: Sequence[Float[Array, "..."]],
    weights: Sequence[float],
    densities: Sequence[float],
    keys: Sequence[jax.Array],
    lam: float = 1.0,
    elect: bool = False,
) -> Float[Array, "..."]:
    """DARE: drop and rescale each task vector (``keys[i]`` its mask), then a weighted sum
    (``b + lam * sum_i w_i tilde tau_i``), or with ``elect`` TIES' disjoint mean (DARE-TIES)."""
    b = base.astype(jnp.float32)
    taus = [
        drop(x.astype(jnp.float32) - b, d, k) for x, d, k in zip(xs, densities, keys, strict=True)
    ]
    if elect:
        return b + lam * disjoint_mean(taus, weights)
    return b + lam * sum(w * t for w, t in zip(weights, taus, strict=True))


def slerp(
    a: Float[Array, "..."], b: Float[Array, "..."], t: float, eps: float = 1e-8
) -> Float[Array, "..."]:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1) of the flattened tensors;
    linear where they are (anti)parallel (``|cos O| > 0.9995``) or one is 0."""
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    na, nb = jnp.linalg.norm(a32), jnp.linalg.norm(b32)
    cos = jnp.sum(a32 * b32) / jnp.maximum(na * nb, eps)
    lerp = (1 - t) * a32 + t * b32
    omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(omega)
    safe = jnp.where(jnp.abs(cos) > SLERP_DOT_THRESHOLD, 1.0, sin)
    spherical = (jnp.sin((1 - t) * omega) * a32 + jnp.sin(t * omega) * b32) / safe
    return jnp.where(jnp.abs(cos) > SLERP_DOT_THRESHOLD, lerp, spherical)


def tsv(
    base: Float[Array, "..."],
    xs: Sequence[Float[Array, "..."]],
    weights: Sequence[float],
    rank_fraction: float = 0.0,
    alpha: float = 1.0,
) -> Float[Array, "..."]:
    """TSV-Merge of a 2-D tensor (top ``k`` singular triplets of each ``w_i tau_i``, the kept
    singular vectors orthogonalised across tasks, ``b + alpha U_perp S V_perp^T``); a 0-D or
    1-D tensor gets ``b + alpha * mean_i w_i tau_i``. See the module doc."""
    _check_matrix_or_vector("tsv", base)
    w, a = jnp.asarray(weights, jnp.float32), jnp.float32(alpha)
    if base.ndim < 2:
        return _mean_task(base, list(xs), w, a)
    return _tsv(base, list(xs), w, a, tsv_rank(min(base.shape), len(xs), rank_fraction))


def tsv_rank(r: int, n_models: int, rank_fraction: float = 0.0) -> int:
    """Singular triplets TSV keeps per task of a matrix of rank bound ``r = min(m, n)``:
    ``max(1, floor(f r))``, ``f = rank_fraction`` or ``1 / n_models`` when 0 (floor, as the
    paper's code; 1e-9 absorbs float error such as 0.29 * 100 = 28.999..)."""
    return max(1, math.floor((rank_fraction or 1.0 / n_models) * r + 1e-9))


def r_tsvm(
    base: Float[Array, "..."],
    xs: Sequence[Float[Array, "..."]],
    weights: Sequence[float],
    outlier_quantile: float = 0.99,
    energy: float = 0.9,
    alpha: float = 1.0,
) -> Float[Array, "..."]:
    """R-TSVM of a 2-D tensor: each ``w_i tau_i`` winsorised at its ``outlier_quantile``
    quantile of magnitudes, then TSV-Merge with the per-task ranks of `r_tsvm_ranks` (the
    ``energy`` share of the squared singular values, capped so they add up to at most
    ``min(m, n)``); a 0-D or 1-D tensor gets ``b + alpha * mean_i w_i tau_i``. Runs eagerly
    (the ranks are read on the host); see the module doc."""
    _check_matrix_or_vector("r_tsvm", base)
    w, a = jnp.asarray(weights, jnp.float32), jnp.float32(alpha)
    if base.ndim < 2:
        return _mean_task(base, list(xs), w, a)
    u, s, vt = _winsorised_svds(base, list(xs), w, jnp.float32(outlier_quantile))
    # The rank rule is piecewise constant in the inputs: it takes no part in gradients.
    ranks = r_tsvm_ranks(np.asarray(jax.lax.stop_gradient(s)), energy)
    return _combine(base, u, s, vt, a, ranks)


def r_tsvm_ranks(sigmas: Float[np.ndarray, "T r"], energy: float = 0.9) -> tuple[int, ...]:
    """R-TSVM's sparsity-adaptive ranks from each task's singular values (rows, descending):
    ``k_i`` = the smallest k whose ``s_i1^2 .. s_ik^2`` hold ``energy`` of ``sum_j s_ij^2`` (1
    for a zero matrix); if ``K = sum_i k_i > max(r, T)`` each becomes ``1 + floor((k_i - 1)
    max(r - T, 0) / (K - T))`` (``r`` = the row length = ``min(m, n)``; then ``sum_i k_i <=
    max(r, T)``: at most ``r``, or one triplet per task when there are more tasks than ``r``)."""
    sigmas = np.asarray(sigmas, np.float64)
    (n_tasks, r) = sigmas.shape
    ranks = []
    for s in sigmas:
        cumulative = np.cumsum(s * s)  # cumulative[-1] is the total, so energy = 1 finds it
        ranks.append(int(np.searchsorted(cumulative, energy * cumulative[-1], side="left")) + 1)
    total = sum(ranks)
    if total > max(r, n_tasks):
        ranks = [1 + (k - 1) * max(r - n_tasks, 0) // (total - n_tasks) for k in ranks]
    return tuple(ranks)


def _check_matrix_or_vector(method: str, base: Float[Array, "..."]) -> None:
    if base.ndim > 2:
        raise ValueError(
            f"{method} merges 2-D matrices and 1-D vectors, got shape {base.shape} (a jaxalign "
            "params leaf stacks its layers: merge the Hugging Face layout, as `jaxalign merge` "
            "does)"
        )


def _task_matrices(
    base: Float[Array, "..."], xs: list[Float[Array, "..."]], weights: Float[Array, " T"]
) -> Float[Array, "T ..."]:
    """``Delta_i = w_i (x_i - b)`` stacked, float32."""
    b = base.astype(jnp.float32)
    taus = jnp.stack([x.astype(jnp.float32) - b for x in xs])
    return taus * weights.reshape((-1,) + (1,) * b.ndim)


@jax.jit
def _mean_task(
    base: Float[Array, " ..."],
    xs: list[Float[Array, " ..."]],
    weights: Float[Array, " T"],
    alpha: Float[Array, ""],
) -> Float[Array, " ..."]:
    """TSV's and R-TSVM's 0-D and 1-D tensors: ``b + alpha * mean_i w_i tau_i``."""
    return base.astype(jnp.float32) + alpha * jnp.mean(_task_matrices(base, xs, weights), axis=0)


@functools.partial(jax.jit, static_argnames="k")
def _tsv(
    base: Float[Array, "m n"],
    xs: list[Float[Array, "m n"]],
    weights: Float[Array, " T"],
    alpha: Float[Array, ""],
    k: int,
) -> Float[Array, "m n"]:
    """`tsv` of a matrix with the kept rank ``k``: one compiled program per shape."""
    u, s, vt = jnp.linalg.svd(_task_matrices(base, xs, weights), full_matrices=False)
    return _combine(base, u, s, vt, alpha, (k,) * len(xs))


@jax.jit
def _winsorised_svds(
    base: Float[Array, "m n"],
    xs: list[Float[Array, "m n"]],
    weights: Float[Array, " T"],
    quantile: Float[Array, ""],
) -> tuple[Float[Array, "T m r"], Float[Array, "T r"], Float[Array, "T r n"]]:
    """The SVDs of the task matrices winsorised at their ``quantile`` quantile of ``|Delta_i|``
    (R-TSVM's outlier-aware weighting)."""
    deltas = _task_matrices(base, xs, weights)
    limit = jnp.quantile(jnp.abs(deltas).reshape(len(xs), -1), quantile, axis=1)[:, None, None]
    return jnp.linalg.svd(jnp.clip(deltas, -limit, limit), full_matrices=False)


@functools.partial(jax.jit, static_argnames="ranks")
def _combine(
    base: Float[Array, "m n"],
    u: Float[Array, "T m r"],
    s: Float[Array, "T r"],
    vt: Float[Array, "T r n"],
    alpha: Float[Array, ""],
    ranks: tuple[int, ...],
) -> Float[Array, "m n"]:
    """TSV's decorrelation and reconstruction: task i's top ``ranks[i]`` triplets, ``U`` and
    ``V`` concatenated across tasks (task by task) and replaced by their polar factors,
    ``b + alpha U_perp diag(S) V_perp^T``."""
    u_cat = jnp.concatenate([u[i, :, :k] for i, k in enumerate(ranks)], axis=1)  # [m, K]
    vt_cat = jnp.concatenate([vt[i, :k] for i, k in enumerate(ranks)], axis=0)  # [K, n]
    s_cat = jnp.concatenate([s[i, :k] for i, k in enumerate(ranks)])
    return base.astype(jnp.float32) + alpha * (_polar(u_cat) * s_cat) @ _polar(vt_cat)


def _polar(a: Float[Array, "m n"]) -> Float[Array, "m n"]:
    """The orthonormal polar factor ``P Q^T`` of ``a = P Sigma Q^T`` (the nearest matrix with
    orthonormal columns, or rows when m < n, in Frobenius norm)."""
    p, _, qt = jnp.linalg.svd(a, full_matrices=False)
    return p @ qt


def relative_change(base: Float[Array, "..."], x: Float[Array, "..."]) -> float:
    """``|x - b| / |b|`` (Frobenius norms, float64); inf where ``|b| = 0 != |x - b|``, 0 where
    both are 0."""
    b, x = np.asarray(base, np.float64), np.asarray(x, np.float64)
    num, den = np.linalg.norm(x - b), np.linalg.norm(b)
    if den == 0:
        return math.inf if num > 0 else 0.0
    return float(num / den)


def restore_selection(
    rule: RestoreRule,
    names: Sequence[str],
    changes: Sequence[float] | None = None,
    sizes: Sequence[int] | None = None,
) -> list[str]:
    """The names ``rule`` restores, in ``names`` order. ``changes`` (`relative_change` per name)
    and ``sizes`` (entries per name) are needed by ``top_k`` and ``fraction`` only."""
    if rule.pattern:
        regex = re.compile(rule.pattern)
        return [name for name in names if regex.search(name)]
    order = sorted(range(len(names)), key=lambda j: -changes[j])  # stable: keeps the order of ties
    if rule.top_k:
        chosen = order[: rule.top_k]
    else:
        need, held, chosen = rule.fraction * sum(sizes), 0, []
        for j in order:
            if held >= need:
                break
            chosen.append(j)
            held += sizes[j]
    return [names[j] for j in sorted(chosen)]


def restore(aligned: dict, finetuned: dict, rule: RestoreRule) -> tuple[dict, list[str]]:
    """Restore-alignment on params trees of one structure: ``finetuned`` with the leaves
    ``rule`` chooses (by '/'-joined path) set to ``aligned``'s. Returns the float32 tree and the
    restored names."""
    names = _leaf_names(finetuned)
    bs, xs = jax.tree.leaves(aligned), jax.tree.leaves(finetuned)
    changes = None if rule.pattern else [relative_change(b, x) for b, x in zip(bs, xs, strict=True)]
    restored = restore_selection(rule, names, changes, [x.size for x in xs])
    chosen = set(restored)
    merged = [
        jnp.asarray(b if name in chosen else x, jnp.float32)
        for name, b, x in zip(names, bs, xs, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(finetuned), merged), restored


def _leaf_names(tree) -> list[str]:
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path in paths]


def merge_tensor(
    method: str,
    name: str,
    base: Float[Array, "..."] | None,
    xs: Sequence[Float[Array, "..."]],
    options: MergeOptions,
) -> Float[Array, "..."]:
    """One tensor of ``method`` (a name in ``METHODS``); ``name`` keys DARE's masks."""
    w, d = options.weights, options.densities
    if method == "linear":
        return linear(xs, w, options.normalize)
    if method == "task_arithmetic":
        return task_arithmetic(base, xs, w, options.lam)
    if method == "ties":
        return ties(base, xs, w, d, options.lam)
    if method in ("dare", "dare_ties"):
        keys = [dare_key(options.seed, name, i) for i in range(len(xs))]
        return dare(base, xs, w, d, keys, options.lam, elect=method == "dare_ties")
    if method == "slerp":
        (x,) = xs
        return slerp(base, x, options.t)
    if method == "tsv":
        return tsv(base, xs, w, options.rank_fraction, options.alpha)
    if method == "r_tsvm":
        return r_tsvm(base, xs, w, options.outlier_quantile, options.energy, options.alpha)
    raise ValueError(f"unknown merge method {method!r}; known: {', '.join(METHODS)}")


def merge_tree(method: str, base: dict | None, models: Sequence[dict], options: MergeOptions):
    """``merge_tensor`` on every leaf of params trees of one structure; a leaf's name (DARE's
    key) is its '/'-joined path. ``base`` may be None for ``linear``. Leaves come back float32.
    (``restore`` chooses tensors over the whole model: see `restore`.)"""
    names = _leaf_names(models[0])
    leaves = [jax.tree.leaves(m) for m in models]
    base_leaves = jax.tree.leaves(base) if base is not None else [None] * len(names)
    merged = [
        merge_tensor(method, name, b, [ls[j] for ls in leaves], options)
        for j, (name, b) in enumerate(zip(names, base_leaves, strict=True))
    ]
    return jax.tree.unflatten(jax.tree.structure(models[0]), merged)
