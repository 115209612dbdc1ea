"""Hot-path kernels: token log-probs / entropy, full-vocabulary KL and generalised JSD from
hidden states.

Every op has a reference (the spec), a vocab-blocked XLA ``custom_vjp`` implementation that never
materialises ``[N, V]`` logits, and Pallas kernels for TPU and GPU. See
``jaxalign.kernels.logprob``, ``jaxalign.kernels.kl`` and ``jaxalign.kernels.jsd`` (reference and
XLA only).
"""

from jaxalign.kernels._dispatch import FALLBACK_ORDER
from jaxalign.kernels.jsd import token_jsd
from jaxalign.kernels.kl import KL_CLAMP, LOG_RATIO_CLAMP, kl_k1, kl_k2, kl_k3, token_kl
from jaxalign.kernels.logprob import sharded_token_logprobs, token_logprobs

__all__ = [
    "FALLBACK_ORDER",
    "KL_CLAMP",
    "LOG_RATIO_CLAMP",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "sharded_token_logprobs",
    "token_jsd",
    "token_kl",
    "token_logprobs",
]
