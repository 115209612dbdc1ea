"""Full-vocabulary per-token KL(p || q) between two models' next-token distributions, and the
sampled-token KL estimators k1, k2, k3 (Schulman, 2020, "Approximating KL divergence").

Implementations (``implementation=``), as for ``token_logprobs``: ``reference`` (two full logits
tensors; the spec), ``xla`` (vocab-blocked online logsumexp, ``custom_vjp``), ``pallas_tpu`` and
``pallas_gpu`` (forward, dh_p and dW_p kernels). ``None`` picks by backend with the fallback order
of ``jaxalign.kernels._dispatch.FALLBACK_ORDER`` (tpu -> pallas_tpu, gpu -> pallas_gpu,
cpu -> xla).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxalign.kernels import _dispatch

KL_CLAMP = 10.0  # bound on each per-token estimate
LOG_RATIO_CLAMP = 20.0  # bound on r = logp_ref - logp before exp


def token_kl(
    hidden_p: Float[Array, "*B Dp"],
    unembedding_p: Float[Array, "Dp V"],
    hidden_q: Float[Array, "*B Dq"],
    unembedding_q: Float[Array, "Dq V"],
    *,
    implementation: str | None = None,
    mask: Array | None = None,
    block_size: int | None = None,
    softcap: float | None = None,
    interpret: bool = False,
) -> Float[Array, "*B"]:
    """``KL(p || q) = sum_j p_j (log p_j - log q_j)`` per token over the full vocabulary, float32.

    ``p = softmax(hidden_p @ unembedding_p)`` (the policy; gets gradients) and
    ``q = softmax(hidden_q @ unembedding_q)`` (the reference; treated as constant, zero gradient).
    With ``softcap`` c (a final-logit soft-capped model family, e.g. Gemma 2) both sides' logits are
    ``c tanh(z / c)``, applied per vocab tile.
    Masked positions (``mask`` 0/False) return 0 with zero gradient. ``hidden_p`` and ``hidden_q``
    share the leading shape; their widths Dp, Dq may differ; V must match. ``implementation`` and
    ``interpret`` as in ``token_logprobs``; ``block_size`` is the vocab tile.
    """
    module = _dispatch.resolve(__name__, implementation, interpret)
    if unembedding_p.shape[1] != unembedding_q.shape[1]:
        raise ValueError(
            f"jaxalign: unembedding_p {unembedding_p.shape} and unembedding_q "
            f"{unembedding_q.shape} must share V"
        )
    if hidden_p.shape[:-1] != hidden_q.shape[:-1]:
        raise ValueError(
            f"jaxalign: hidden_p {hidden_p.shape} and hidden_q {hidden_q.shape} must share the "
            "leading (token) shape"
        )
    lead = hidden_p.shape[:-1]
    hp = hidden_p.reshape(-1, hidden_p.shape[-1])
    hq = jax.lax.stop_gradient(hidden_q.reshape(-1, hidden_q.shape[-1]))
    wq = jax.lax.stop_gradient(unembedding_q)
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(f"jaxalign: mask has shape {mask.shape}, expected {lead}")
        m = jnp.asarray(mask).reshape(-1).astype(bool)
        hp = jnp.where(m[:, None], hp, jnp.zeros((), hp.dtype))
        hq = jnp.where(m[:, None], hq, jnp.zeros((), hq.dtype))
    kwargs = (
        {"interpret": interpret} if module.__name__.endswith(("pallas_tpu", "pallas_gpu")) else {}
    )
    out = module.kl(hp, unembedding_p, hq, wq, block_size=block_size, softcap=softcap, **kwargs)
    if mask is not None:
        out = jnp.where(m, out, 0.0)
    return out.reshape(lead)


def _estimate(kind: str, logp: Array, logp_ref: Array) -> Array:
    """Schulman's estimators of KL(pi || ref) from one sample, with ``r = logp_ref - logp``.

    ``r`` is first clipped to +-``LOG_RATIO_CLAMP`` (keeps ``exp(r)`` finite), the estimate then to
    +-``KL_CLAMP`` (as verl's ``low_var_kl``); clipped entries have zero gradient.
    """
    r = jnp.clip(logp_ref - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    k = {"k1": lambda: -r, "k2": lambda: 0.5 * jnp.square(r), "k3": lambda: jnp.expm1(r) - r}
    return jnp.clip(k[kind](), -KL_CLAMP, KL_CLAMP)


def kl_k1(logp: Float[Array, "*B"], logp_ref: Float[Array, "*B"]) -> Float[Array, "*B"]:
    """k1 = -r = logp - logp_ref: unbiased, high variance, can be negative. Clamped to [-10, 10]."""
    return _estimate("k1", logp, logp_ref)


def kl_k2(logp: Float[Array, "*B"], logp_ref: Float[Array, "*B"]) -> Float[Array, "*B"]:
    """k2 = r^2 / 2: biased, low variance, >= 0. Clamped to [0, 10]."""
    return _estimate("k2", logp, logp_ref)


def kl_k3(logp: Float[Array, "*B"], logp_ref: Float[Array, "*B"]) -> Float[Array, "*B"]:
    """k3 = exp(r) - 1 - r: unbiased, low variance, >= 0 (GRPO's KL term). Clamped to [0, 10]."""
    return _estimate("k3", logp, logp_ref)


__all__ = ["KL_CLAMP", "LOG_RATIO_CLAMP", "kl_k1", "kl_k2", "kl_k3", "token_kl"]
