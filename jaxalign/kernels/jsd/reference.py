"""Reference generalised Jensen-Shannon divergence per token: the specification.

With p_S = softmax(h_S @ W_S) (the student), p_T = softmax(h_T @ W_T) (the teacher) and
m = b p_T + (1 - b) p_S over the full vocabulary,

    JSD_b = b KL(p_T || m) + (1 - b) KL(p_S || m)            for 0 < b < 1,
    JSD_0 = KL(p_T || p_S)   (forward KL),   JSD_1 = KL(p_S || p_T)   (reverse KL),

the end points being the limits of JSD_b / b (b -> 0) and JSD_b / (1 - b) (b -> 1); the
unnormalised JSD_b itself tends to 0 there. Gradients by autodiff (the teacher is constant).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

PerToken = Float[Array, "N"]


def mixture_terms(logp_s, logp_t, beta: float):
    """Per vocabulary entry, the summands of JSD_b (shape of ``logp_s``) and of KL(p_S || m)
    (the student's half; what the gradient needs), from the two log-softmaxes."""
    p_s, p_t = jnp.exp(logp_s), jnp.exp(logp_t)
    if beta == 0.0:
        return p_t * (logp_t - logp_s), None
    if beta == 1.0:
        return p_s * (logp_s - logp_t), p_s * (logp_s - logp_t)
    log_m = jnp.logaddexp(jnp.log(beta) + logp_t, jnp.log1p(-beta) + logp_s)
    student = p_s * (logp_s - log_m)
    return beta * p_t * (logp_t - log_m) + (1.0 - beta) * student, student


def jsd(
    hidden_s: Float[Array, "N Ds"],
    unembedding_s: Float[Array, "Ds V"],
    hidden_t: Float[Array, "N Dt"],
    unembedding_t: Float[Array, "Dt V"],
    *,
    beta: float,
    block_size: int | None = None,
) -> PerToken:
    """Per-token JSD_b in float32 from both full ``[N, V]`` logits; ``block_size`` unused."""
    del block_size
    zs = jnp.dot(hidden_s, unembedding_s, preferred_element_type=jnp.float32)
    zt = jnp.dot(hidden_t, unembedding_t, preferred_element_type=jnp.float32)
    terms, _ = mixture_terms(jax.nn.log_softmax(zs, axis=-1), jax.nn.log_softmax(zt, axis=-1), beta)
    return jnp.sum(terms, axis=-1)
