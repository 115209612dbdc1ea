"""Float64 NumPy merges written from the formulas (jaxalign/merge/methods.py docstring)."""

from __future__ import annotations

import numpy as np


def linear(xs, w, normalize=True):
    total = sum(wi * np.float64(x) for wi, x in zip(w, xs, strict=True))
    return total / sum(w) if normalize else total


def task_arithmetic(b, xs, w, lam):
    b = np.float64(b)
    return b + lam * sum(wi * (np.float64(x) - b) for wi, x in zip(w, xs, strict=True))


def trim(tau, density):
    flat = tau.ravel()
    k = int(round(density * flat.size))
    order = sorted(range(flat.size), key=lambda j: -abs(flat[j]))[:k]
    out = np.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(tau.shape)


def disjoint_mean(taus, w):
    s = np.sign(sum(wi * t for wi, t in zip(w, taus, strict=True)))
    num = np.zeros_like(taus[0])
    den = np.zeros_like(taus[0])
    for wi, t in zip(w, taus, strict=True):
        agree = (np.sign(t) == s) & (t != 0)
        num += np.where(agree, wi * t, 0.0)
        den += np.where(agree, wi, 0.0)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def ties(b, xs, w, d, lam):
    b = np.float64(b)
    return b + lam * disjoint_mean(
        [trim(np.float64(x) - b, di) for x, di in zip(xs, d, strict=True)], w
    )


def dare(b, xs, w, d, masks, lam, elect=False):
    """``masks[i]``: model i's keep mask (the Bernoulli draw is part of the contract)."""
    b = np.float64(b)
    taus = [m * (np.float64(x) - b) / di for x, di, m in zip(xs, d, masks, strict=True)]
    if elect:
        return b + lam * disjoint_mean(taus, w)
    return b + lam * sum(wi * t for wi, t in zip(w, taus, strict=True))


def slerp(a, b, t):
    a, b = np.float64(a), np.float64(b)
    cos = np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def restore(bs, xs, names, pattern=None, top_k=None, fraction=None):
    """Restore-alignment on lists of tensors: the names chosen and the restored list. The
    relative change is |x - b| / |b| in float64 (inf when |b| = 0 < |x - b|, 0 when both are)."""
    import re

    if pattern is not None:
        chosen = {n for n in names if re.search(pattern, n)}
    else:
        changes = []
        for b, x in zip(bs, xs, strict=True):
            num = np.sqrt(np.sum((np.float64(x) - np.float64(b)) ** 2))
            den = np.sqrt(np.sum(np.float64(b) ** 2))
            changes.append(np.inf if den == 0 and num > 0 else 0.0 if den == 0 else num / den)
        ranked = sorted(range(len(names)), key=lambda j: (-changes[j], j))
        if top_k is not None:
            chosen = {names[j] for j in ranked[:top_k]}
        else:
            total, chosen, held = sum(np.size(x) for x in xs), set(), 0
            for j in ranked:
                if held >= fraction * total:
                    break
                chosen.add(names[j])
                held += np.size(xs[j])
    out = [
        np.float64(b) if n in chosen else np.float64(x)
        for b, x, n in zip(bs, xs, names, strict=True)
    ]
    return [n for n in names if n in chosen], out


def tsv(b, xs, w, rank_fraction, alpha):
    """TSV-Merge: per 2-D tensor the top k = max(1, floor(f min(m, n))) singular triplets of each
    w_i (x_i - b) (f = rank_fraction, 0 = 1 / T), U and V concatenated across tasks and replaced
    by their polar factors, b + alpha U_perp diag(S) V_perp^T; 1-D: b + alpha mean_i w_i tau_i."""
    b = np.float64(b)
    deltas = [wi * (np.float64(x) - b) for wi, x in zip(w, xs, strict=True)]
    if b.ndim < 2:
        return b + alpha * np.mean(deltas, axis=0)
    k = max(1, int(np.floor((rank_fraction or 1 / len(xs)) * min(b.shape) + 1e-9)))
    return _decorrelated(b, deltas, [k] * len(xs), alpha)


def r_tsvm_ranks(sigmas, energy):
    """Smallest k_i with sum_{j<=k} s_ij^2 >= energy * sum_j s_ij^2 (1 for a zero matrix); then,
    when K = sum k_i > max(r, T): k_i <- 1 + floor((k_i - 1) max(r - T, 0) / (K - T))."""
    ranks = []
    for s in sigmas:
        energies = [float(v) ** 2 for v in s]
        k = 1
        while sum(energies[:k]) < energy * sum(energies) and k < len(energies):
            k += 1
        ranks.append(k)
    r, t, total = len(sigmas[0]), len(sigmas), sum(ranks)
    if total > max(r, t):
        ranks = [1 + int(np.floor((k - 1) * max(r - t, 0) / (total - t))) for k in ranks]
    return ranks


def r_tsvm(b, xs, w, outlier_quantile, energy, alpha):
    """R-TSVM (jaxalign's form): each 2-D task matrix w_i (x_i - b) winsorised at the
    outlier_quantile quantile q_i of its |entries| (linear interpolation: entries beyond +-q_i
    set to +-q_i), ranks by r_tsvm_ranks, then TSV's decorrelation; 1-D as in TSV."""
    b = np.float64(b)
    deltas = [wi * (np.float64(x) - b) for wi, x in zip(w, xs, strict=True)]
    if b.ndim < 2:
        return b + alpha * np.mean(deltas, axis=0)
    clipped = []
    for d in deltas:
        q = np.quantile(np.abs(d), outlier_quantile)
        clipped.append(np.where(np.abs(d) > q, np.sign(d) * q, d))
    sigmas = [np.linalg.svd(d, compute_uv=False) for d in clipped]
    return _decorrelated(b, clipped, r_tsvm_ranks(sigmas, energy), alpha)


def _decorrelated(b, deltas, ranks, alpha):
    """b + alpha U_perp diag(S) V_perp^T from task i's top ranks[i] singular triplets."""
    svds = [np.linalg.svd(d, full_matrices=False) for d in deltas]
    u = np.concatenate([u[:, :k] for (u, _, _), k in zip(svds, ranks, strict=True)], axis=1)
    s = np.concatenate([s[:k] for (_, s, _), k in zip(svds, ranks, strict=True)])
    v = np.concatenate([vt[:k].T for (_, _, vt), k in zip(svds, ranks, strict=True)], axis=1)

    def polar(a):
        p, _, qt = np.linalg.svd(a, full_matrices=False)
        return p @ qt

    return b + alpha * polar(u) @ np.diag(s) @ polar(v).T
