"""Rollouts: a prompt batch's sampled completions laid out as training rows.

One row per completion (R = prompts x n, row i = prompt i // n, sample i % n): the left-padded
prompt (Tp columns) followed by the completion (M = max_new_tokens columns), shifted by one as
every training batch is (inputs ``seq[:-1]``, targets ``seq[1:]``), so T = Tp + M - 1 and the
rows are in the training layout of `jaxalign.data.layout`:

    tokens, targets, positions, segment_ids, seq_index   [R, T]  (seq_index: row r = sequence r)
    loss_mask       [R, T]  1 on the targets that are completion tokens, the EOS / stop token
                            that ended the completion included (so stopping is trained)
    example_mask    [R]     1 for the samples of real prompts
    sampler_logps   [R, T]  the sampler's log-prob of each completion token (temperature
                            applied, before truncation: `jaxalign.sampling.GenerateResult`),
                            aligned with the targets, 0 elsewhere

Completion token j of row r is target column Tp - 1 + j; its input column is Tp - 1 + j too (the
previous token). Positions continue the prompt's: a completion token at column c has position
L + (c - Tp), L the prompt's length.
"""

from __future__ import annotations

import numpy as np


def rollout_rows(prompts: dict, result, pad_id: int) -> dict[str, np.ndarray]:
    """The training rows of a rollout (layout in the module docstring).

    `prompts`: the prompt batch given to `jaxalign.sampling.generate` (left-padded,
    `jaxalign.data.make_prompt_pipeline`); `result`: its `GenerateResult` (after stop strings)."""
    tokens = np.asarray(prompts["prompt_tokens"])
    B, Tp = tokens.shape
    n = result.tokens.shape[0] // B
    M = result.tokens.shape[1]
    R, T = B * n, Tp + M - 1
    rows = np.repeat(np.arange(B), n)
    prompt_len = np.asarray(prompts["prompt_lengths"])[rows]
    lengths = np.asarray(result.lengths)
    seq = np.concatenate([tokens[rows], np.asarray(result.tokens)], axis=1)  # [R, Tp + M]
    col = np.arange(T)[None, :]
    completion = (col >= Tp - 1) & (col < Tp - 1 + lengths[:, None])  # targets in the completion
    real = (col >= Tp - prompt_len[:, None]) & (col < Tp - 1 + lengths[:, None])  # real inputs
    positions = np.zeros((R, T), np.int64)
    positions[:, :Tp] = np.asarray(prompts["prompt_positions"])[rows]
    positions[:, Tp:] = prompt_len[:, None] + np.arange(T - Tp)[None, :]
    sampler = np.zeros((R, T), np.float32)
    sampler[:, Tp - 1 :] = np.asarray(result.logprobs)[:, : T - Tp + 1]
    return {
        "tokens": np.where(real, seq[:, :-1], pad_id).astype(np.int32),
        "targets": np.where(real, seq[:, 1:], pad_id).astype(np.int32),
        "loss_mask": completion.astype(np.float32),
        "positions": np.where(real, positions, 0).astype(np.int32),
        "segment_ids": real.astype(np.int32),
        "seq_index": np.where(real, np.arange(R)[:, None], -1).astype(np.int32),
        "example_mask": np.asarray(prompts["example_mask"], np.float32)[rows],
        "sampler_logps": np.where(completion, sampler, 0.0).astype(np.float32),
    }
