"""Reference full-vocabulary KL(p || q) per token: the specification.

KL = sum_j p_j (log p_j - log q_j),  p = softmax(h_p @ W_p),  q = softmax(h_q @ W_q);
with a soft-cap c both logits are capped first: z -> c tanh(z / c).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxalign.kernels import _softcap

PerToken = Float[Array, "N"]


def kl(
    hidden_p: Float[Array, "N Dp"],
    unembedding_p: Float[Array, "Dp V"],
    hidden_q: Float[Array, "N Dq"],
    unembedding_q: Float[Array, "Dq V"],
    *,
    block_size: int | None = None,
    softcap: float | None = None,
) -> PerToken:
    """Per-token KL(p || q) in float32 from both full ``[N, V]`` logits; ``block_size`` unused."""
    del block_size
    zp = jnp.dot(hidden_p, unembedding_p, preferred_element_type=jnp.float32)
    zq = jnp.dot(hidden_q, unembedding_q, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(_softcap.cap(zp, softcap), axis=-1)
    logq = jax.nn.log_softmax(_softcap.cap(zq, softcap), axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
