"""Rollout rows: a sampled completion laid out as a training row, checked against a walk over the
sequence written out by hand."""

import types

import numpy as np

from jaxalign.rl.rollout import rollout_rows

PAD, EOS = 3, 2


def test_rows_hold_prompt_then_completion_with_the_eos_trained():
    # Two prompts (lengths 2 and 3, left-padded to Tp = 4), two samples each, M = 3 new tokens.
    prompts = {
        "prompt_tokens": np.array([[PAD, PAD, 1, 7], [PAD, 1, 8, 9]], np.int32),
        "prompt_segment_ids": np.array([[0, 0, 1, 1], [0, 1, 1, 1]], np.int32),
        "prompt_positions": np.array([[0, 0, 0, 1], [0, 0, 1, 2]], np.int32),
        "prompt_lengths": np.array([2, 3], np.int32),
        "example_mask": np.ones(2, np.float32),
    }
    completions = [[20, EOS, PAD], [21, 22, 23], [EOS, PAD, PAD], [24, 25, EOS]]
    lengths = np.array([2, 3, 1, 3], np.int32)
    sampler = np.array([[-0.5, -0.1, 0], [-1, -2, -3], [-0.25, 0, 0], [-4, -5, -6]], np.float32)
    result = types.SimpleNamespace(
        tokens=np.array(completions, np.int32), lengths=lengths, logprobs=sampler
    )
    rows = rollout_rows(prompts, result, PAD)
    T = 4 + 3 - 1
    for key in ("tokens", "targets", "loss_mask", "positions", "segment_ids", "seq_index"):
        assert rows[key].shape == (4, T), key
    for r in range(4):
        p = r // 2
        L, n = int(prompts["prompt_lengths"][p]), int(lengths[r])
        sequence = list(prompts["prompt_tokens"][p][4 - L :]) + completions[r][:n]
        start = 4 - L  # first real column
        for k in range(len(sequence) - 1):  # input k -> target k + 1
            col = start + k
            assert rows["tokens"][r, col] == sequence[k]
            assert rows["targets"][r, col] == sequence[k + 1]
            assert rows["positions"][r, col] == k
            assert rows["segment_ids"][r, col] == 1 and rows["seq_index"][r, col] == r
            completion_target = k + 1 >= L
            assert rows["loss_mask"][r, col] == float(completion_target)
            j = k + 1 - L  # the completion token this target is
            want = sampler[r, j] if completion_target else 0.0
            assert rows["sampler_logps"][r, col] == want
        # Everything else is padding, masked.
        outside = np.ones(T, bool)
        outside[start : start + len(sequence) - 1] = False
        assert (rows["segment_ids"][r, outside] == 0).all()
        assert (rows["loss_mask"][r, outside] == 0).all()
        assert (rows["seq_index"][r, outside] == -1).all()
    # The token that ended a completion is a target in the loss mask: stopping is trained.
    assert (
        rows["loss_mask"][0].sum() == 2 and rows["targets"][0][rows["loss_mask"][0] > 0][-1] == EOS
    )
    assert (
        rows["loss_mask"][2].sum() == 1 and rows["targets"][2][rows["loss_mask"][2] > 0][0] == EOS
    )
    np.testing.assert_array_equal(rows["example_mask"], np.ones(4))
