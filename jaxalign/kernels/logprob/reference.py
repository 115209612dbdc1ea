"""Reference token log-probs: the specification every other implementation is tested against.

Materialises the full ``[N, V]`` logits, so it is only for tests, tiny models and as a last resort.

    z = h @ W  (soft-capped: z = c tanh(h @ W / c)),
    logp_t = z_t - logsumexp(z),  entropy = -sum_j p_j log p_j,  sum_sq = sum_j p_j^2.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxalign.kernels import _softcap

PerToken = Float[Array, "N"]
TokenIds = Int[Array, "N"]


def logprobs(
    hidden: Float[Array, "N D"],
    unembedding: Float[Array, "D V"],
    targets: TokenIds,
    *,
    return_entropy: bool = False,
    return_sum_sq: bool = False,
    block_size: int | None = None,
    softcap: float | None = None,
) -> tuple[PerToken, PerToken | None, PerToken | None]:
    """Per-token ``(logp, entropy, sum_sq)`` in float32; extras are None unless asked.

    ``targets`` must already lie in ``[0, V)`` (the dispatcher checks). ``block_size`` is ignored.
    Differentiable with plain autodiff for all three outputs.
    """
    del block_size
    logits = jnp.dot(hidden, unembedding, preferred_element_type=jnp.float32)  # [N, V]
    logits = _softcap.cap(logits, softcap)
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[:, None], axis=-1)[:, 0]
    probs = jnp.exp(logp_all)
    entropy = -jnp.sum(probs * logp_all, axis=-1) if return_entropy else None
    sum_sq = jnp.sum(probs * probs, axis=-1) if return_sum_sq else None
    return logp, entropy, sum_sq
