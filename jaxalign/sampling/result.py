"""What generation returns, and the host-side steps after the device loop: stop strings, gathering
every process's rows for writing."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """NumPy arrays, one row per sample: row i is prompt ``i // n``, sample ``i % n``
    (R = B * n rows, M = max_new_tokens).

    tokens           int32   [R, M]  generated ids; ``options.pad_id`` after the end
    lengths          int32   [R]     generated tokens, counting the EOS / stop token that ended
                                     the row
    finish_reason    str     [R]     "stop" (EOS, a stop id or a stop string) or "length"
    logprobs         float32 [R, M]  log-prob of each generated token under the sampling
                                     distribution before truncation and penalties:
                                     log_softmax(z / T) over the full vocabulary (T > 0) with z the
                                     (combined) logits; at T = 0 log_softmax(z), equal to
                                     ``policy_logprobs`` with one model; 0 after the end
    policy_logprobs  float32 [R, M]  log_softmax(z_0) at temperature 1 under model 0 (the policy);
                                     0 after the end
    prompt_index     int32   [R]     the row's prompt in the batch (``i // n``)
    text             str     [R]     the detokenised completion, cut before the first stop
                                     string (None when generate was given no tokenizer)
    """

    tokens: np.ndarray
    lengths: np.ndarray
    finish_reason: np.ndarray
    logprobs: np.ndarray
    policy_logprobs: np.ndarray
    prompt_index: np.ndarray
    text: np.ndarray | None = None


def _first_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Start of the first occurrence of any stop string in ``text``; -1 if none."""
    starts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(starts, default=-1)


def detokenize(
    result: GenerateResult, tokenizer, stop_strings: Sequence[str] = (), pad_id: int = 0
) -> GenerateResult:
    """Adds ``text`` and applies ``stop_strings``: a row whose completion contains one ends at
    the shortest token prefix whose text contains it (that token is the row's last, kept like a
    stop token, finish_reason "stop"); its text is cut just before the stop string.

    Ids the tokenizer does not have (a model vocabulary padded past the tokenizer's) render as
    nothing; special tokens render as the tokenizer's ``decode`` renders them (EOS: nothing).
    """
    tokens, lengths = result.tokens.copy(), result.lengths.copy()
    logprobs, policy = result.logprobs.copy(), result.policy_logprobs.copy()
    finish = result.finish_reason.copy()
    vocab = getattr(tokenizer, "vocab_size", None)

    def decode(ids: np.ndarray) -> str:
        return tokenizer.decode(ids if vocab is None else ids[ids < vocab])

    texts = []
    for i in range(tokens.shape[0]):
        row = tokens[i, : lengths[i]]
        text = decode(row)
        if stop_strings and _first_stop(text, stop_strings) >= 0:
            lo, hi = 1, len(row)  # smallest k whose prefix text contains a stop string
            while lo < hi:
                mid = (lo + hi) // 2
                if _first_stop(decode(row[:mid]), stop_strings) >= 0:
                    hi = mid
                else:
                    lo = mid + 1
            text = decode(row[:lo])
            text = text[: _first_stop(text, stop_strings)]
            tokens[i, lo:] = pad_id
            logprobs[i, lo:] = 0.0
            policy[i, lo:] = 0.0
            lengths[i] = lo
            finish[i] = "stop"
        texts.append(text)
    return dataclasses.replace(
        result,
        tokens=tokens,
        lengths=lengths,
        finish_reason=finish,
        logprobs=logprobs,
        policy_logprobs=policy,
        text=np.array(texts, dtype=object),
    )


def _allgather_strings(values: np.ndarray) -> np.ndarray:
    """Every process's strings, concatenated in process order (UTF-8 bytes padded to one length)."""
    encoded = [s.encode() for s in values]
    longest = np.int32(max(map(len, encoded), default=0))
    width = int(multihost_utils.process_allgather(longest).max())
    buf = np.zeros((len(encoded), max(width, 1)), np.uint8)
    sizes = np.array([len(b) for b in encoded], np.int32)
    for i, b in enumerate(encoded):
        buf[i, : len(b)] = np.frombuffer(b, np.uint8)
    all_buf = multihost_utils.process_allgather(buf, tiled=True)
    all_sizes = multihost_utils.process_allgather(sizes, tiled=True)
    return np.array(
        [bytes(row[:n]).decode() for row, n in zip(all_buf, all_sizes, strict=True)], dtype=object
    )


def gather_to_host0(result: GenerateResult) -> GenerateResult:
    """Every process's rows in one result, in process order, for process 0 to write.

    Multi-host generation leaves each process with the rows of its own prompts; this gathers
    them (``multihost_utils.process_allgather``; every process receives the whole result, and
    ``prompt_index`` is offset so it counts the prompts of all processes). Every process must
    call it. On one process it returns ``result`` itself.
    """
    if jax.process_count() == 1:
        return result

    def gather(x):
        return multihost_utils.process_allgather(np.asarray(x), tiled=True)

    n_prompts = int(result.prompt_index.max(initial=-1)) + 1
    counts = multihost_utils.process_allgather(np.int32(n_prompts))
    offsets = np.repeat(np.cumsum(counts) - counts, result.prompt_index.shape[0])
    return GenerateResult(
        tokens=gather(result.tokens),
        lengths=gather(result.lengths),
        finish_reason=_allgather_strings(result.finish_reason),
        logprobs=gather(result.logprobs),
        policy_logprobs=gather(result.policy_logprobs),
        prompt_index=gather(result.prompt_index) + offsets.astype(np.int32),
        text=None if result.text is None else _allgather_strings(result.text),
    )
