"""Final-logit soft-capping, shared by every kernel (Gemma 2; Gemma Team, 2024).

    z -> c tanh(z / c),   d/dz = 1 - tanh^2(z / c) = 1 - (capped / c)^2.

Kernels cap each vocabulary tile as they compute it and chain the derivative into d loss / d z,
so a capped model's log-probs and KL never need the full ``[N, V]`` logits either.
"""

import jax.numpy as jnp


def cap(z, softcap: float | None):
    """``softcap * tanh(z / softcap)``, or ``z`` when ``softcap`` is None."""
    return z if softcap is None else softcap * jnp.tanh(z / softcap)


def chain(dz_capped, capped, softcap: float | None, valid=None):
    """d loss / d z from d loss / d capped: times ``1 - (capped / softcap)^2``; 0 where not
    ``valid`` (tile columns past V hold -inf)."""
    if softcap is None:
        return dz_capped
    slope = 1.0 - jnp.square(capped / softcap)
    if valid is not None:
        slope = jnp.where(valid, slope, 0.0)
    return dz_capped * slope
