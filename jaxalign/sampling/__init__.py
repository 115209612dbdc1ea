"""Batched generation on the training mesh (`jaxalign.sampling.generate`), the decode core that
guided decoding plugs into (`decode`), guided decoding (`eft`, `nudging`, `genarm`; module
`guided`), best-of-N, decoding diagnostics (module `diagnostics`), and the `jaxalign generate` /
`jaxalign diagnose` commands' logic.

    from jaxalign.sampling import SamplingOptions, generate, prompts_from_ids
    prompts = prompts_from_ids([[1, 7, 9], [1, 4]], pad_id=3)
    options = SamplingOptions(max_new_tokens=32, temperature=0.7, top_p=0.9, eos_id=2, pad_id=3)
    result = generate(config, params, prompts, rng=jax.random.key(0), options=options)
    result.tokens, result.lengths, result.finish_reason, result.logprobs, result.policy_logprobs
"""

from jaxalign.sampling.engine import (
    Combine,
    check_prompt_lengths,
    decode,
    generate,
    lower_generate,
    prompts_from_ids,
)
from jaxalign.sampling.guided import eft, genarm, nudging
from jaxalign.sampling.options import OPTION_NAMES, SamplingOptions, options_from_dict
from jaxalign.sampling.result import GenerateResult, detokenize, gather_to_host0

__all__ = [
    "OPTION_NAMES",
    "Combine",
    "GenerateResult",
    "SamplingOptions",
    "check_prompt_lengths",
    "decode",
    "detokenize",
    "eft",
    "gather_to_host0",
    "generate",
    "genarm",
    "nudging",
    "lower_generate",
    "options_from_dict",
    "prompts_from_ids",
]
