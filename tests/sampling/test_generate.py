"""The sampling engine on a tiny model: log-probs equal the training path, every option does what
it says, determinism, no recompiles for new option values, stops, bad input, several models.

One batch shape is used throughout (3 prompts in a 16-token bucket, 12 new tokens, n = 2, one
stop id) so the loop compiles once for most tests.
"""

import pathlib

import jax
import numpy as np
import pytest

from jaxalign import models as M
from jaxalign.errors import ConfigError
from jaxalign.kernels import token_logprobs
from jaxalign.sampling import (
    GenerateResult,
    SamplingOptions,
    decode,
    gather_to_host0,
    generate,
    options_from_dict,
    prompts_from_ids,
)
from jaxalign.sampling.engine import _decode_loop

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS, N = 12, 2
PAD, EOS = 3, 2
PROMPTS = [[1, 45, 12, 99, 7], [1, 300, 301], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    """tiny-64 with a 20x unembedding, so distributions are far from uniform: |z| up to ~13.

    The 1e-5 log-prob tolerance is float32 rounding of z_t - logsumexp(z) at that magnitude
    (measured against float64: 4.6e-6 for the sampler, 2.9e-6 for the training kernel). At 60x
    (|z / T| ~ 60) both exceed it (1.1e-5 and 1.6e-5): the rounding grows with the logits.
    """
    config = M.get_preset("tiny-64")
    params = M.init_params(config, jax.random.key(0))
    params["unembed"]["kernel"] = params["unembed"]["kernel"] * 20.0
    return config, params


def _run(model, rng=0, prompts=PROMPTS, **kw):
    config, params = model
    opts = dict(max_new_tokens=STEPS, n=N, eos_id=EOS, pad_id=PAD) | kw
    return generate(
        config,
        params,
        prompts_from_ids(prompts, PAD),
        rng=jax.random.key(rng),
        options=SamplingOptions(**opts),
    )


_forward = jax.jit(M.forward, static_argnums=0)


def _completion_hidden(model, result, prompts=PROMPTS, n=N):
    """Training-path hidden states before each generated token, [R, STEPS, D], from one
    right-padded batch of prompt + completion rows, and the mask of generated tokens [R, STEPS]."""
    config, params = model
    R = result.tokens.shape[0]
    T = max(map(len, prompts)) + STEPS
    tokens, segments = np.zeros((R, T), np.int32), np.zeros((R, T), np.int32)
    where = np.zeros((R, STEPS), np.int32)
    for r in range(R):
        prompt, n_new = prompts[r // n], int(result.lengths[r])
        seq = prompt + result.tokens[r, :n_new].tolist()
        tokens[r, : len(seq)], segments[r, : len(seq)] = seq, 1
        where[r] = len(prompt) - 1 + np.arange(STEPS)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (R, T))
    hidden = _forward(config, params, tokens, positions, segments)
    hidden = np.take_along_axis(np.asarray(hidden), where[:, :, None], axis=1)
    return hidden, np.arange(STEPS)[None] < result.lengths[:, None]


def _training_logprobs(model, result, temperature, prompts=PROMPTS, n=N):
    """Per-token log-probs of each completion from `forward` + `token_logprobs` (hidden / T for
    the sampling distribution), [R, STEPS], 0 after the end."""
    config, params = model
    hidden, mask = _completion_hidden(model, result, prompts, n)
    w = M.unembedding(config, params)
    targets = np.where(mask, result.tokens, 0)
    policy = np.asarray(token_logprobs(hidden, w, targets, mask=mask))
    if temperature == 0:
        return policy, policy
    return np.asarray(token_logprobs(hidden / temperature, w, targets, mask=mask)), policy


def _full_logits(model, result):
    config, params = model
    hidden, mask = _completion_hidden(model, result)
    return np.asarray(M.logits(config, params, hidden)), mask


def test_logprobs_equal_the_training_path_when_sampling(model):
    result = _run(model, temperature=0.7, top_k=40, top_p=0.9)
    sampled, policy = _training_logprobs(model, result, 0.7)
    np.testing.assert_allclose(result.logprobs, sampled, atol=TOL, rtol=0)
    np.testing.assert_allclose(result.policy_logprobs, policy, atol=TOL, rtol=0)
    assert not np.allclose(sampled, policy, atol=1e-2)  # the temperature shows
    assert result.tokens.shape == (len(PROMPTS) * N, STEPS) and result.tokens.dtype == np.int32
    np.testing.assert_array_equal(result.prompt_index, [0, 0, 1, 1, 2, 2])


def test_greedy_follows_the_full_forward_argmax_and_logprobs_are_the_policys(model):
    result = _run(model, temperature=0.0)
    np.testing.assert_array_equal(result.logprobs, result.policy_logprobs)
    z, mask = _full_logits(model, result)
    np.testing.assert_array_equal(np.where(mask, np.argmax(z, -1), PAD), result.tokens)
    np.testing.assert_array_equal(result.tokens[0], result.tokens[1])  # n copies of greedy


@pytest.mark.parametrize(
    "narrow", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(top_k=3, top_p=1e-6)]
)
def test_narrowest_truncation_equals_greedy(model, narrow):
    greedy = _run(model, temperature=0.0)
    result = _run(model, rng=5, temperature=0.7, **narrow)
    np.testing.assert_array_equal(result.tokens, greedy.tokens)


def test_samples_are_reproducible_and_differ_across_seeds_and_samples(model):
    a, b, c = _run(model, rng=1), _run(model, rng=1), _run(model, rng=2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)
    for i in range(len(PROMPTS)):  # the n samples of a prompt differ
        assert not np.array_equal(a.tokens[N * i], a.tokens[N * i + 1])


def test_truncation_restricts_samples_to_the_kept_set(model):
    """Every token sampled with top_k=3 is among the 3 largest logits of the full forward."""
    result = _run(model, rng=3, temperature=1.5, top_k=3)
    z, mask = _full_logits(model, result)
    rank = (z > np.take_along_axis(z, result.tokens[:, :, None], -1)).sum(-1)
    assert rank[mask].max() < 3 and mask.sum() > 30


def test_option_values_never_recompile(model):
    _run(model, temperature=0.0)
    before = _decode_loop._cache_size()
    for kw in [
        dict(temperature=0.3, top_k=7, top_p=0.5, min_p=0.1),
        dict(temperature=1.1, repetition_penalty=1.3, presence_penalty=0.4),
        dict(temperature=0.0, eos_id=9, pad_id=0),
        dict(temperature=1.0, eos_id=None, stop_token_ids=(17,)),
    ]:
        _run(model, rng=4, **kw)
    assert _decode_loop._cache_size() == before


def test_stop_token_ends_the_row_and_is_part_of_it(model):
    free = _run(model, temperature=0.0, eos_id=None, stop_token_ids=(511,))
    stop = int(free.tokens[2, 3])
    first = int(np.flatnonzero(free.tokens[2] == stop)[0])
    result = _run(model, temperature=0.0, eos_id=None, stop_token_ids=(stop,))
    for r in (2, 3):
        assert result.lengths[r] == first + 1 and result.finish_reason[r] == "stop"
        np.testing.assert_array_equal(result.tokens[r, : first + 1], free.tokens[r, : first + 1])
        np.testing.assert_array_equal(result.tokens[r, first + 1 :], PAD)
        assert result.policy_logprobs[r, first] < 0  # the stop token has its log-prob
        np.testing.assert_array_equal(result.policy_logprobs[r, first + 1 :], 0.0)
    for r in range(result.tokens.shape[0]):
        hits = np.flatnonzero(free.tokens[r] == stop)
        want = hits[0] + 1 if len(hits) else STEPS
        assert result.lengths[r] == want
        assert result.finish_reason[r] == ("stop" if len(hits) else "length")


def test_presence_penalty_stops_repeats(model):
    free = _run(model, temperature=0.0)
    assert any(len(set(row)) < STEPS for row in free.tokens.tolist())  # greedy repeats itself
    result = _run(model, temperature=0.0, presence_penalty=1e4)
    for r in range(result.tokens.shape[0]):
        row = result.tokens[r, : result.lengths[r]].tolist()
        assert len(set(row)) == len(row)


class _Letters:
    """Stand-in tokenizer: token i is the letter chr(97 + i % 26) written 1 + i % 3 times, so a
    stop string can span token boundaries or end inside a token."""

    def decode(self, ids):
        return "".join(chr(97 + int(i) % 26) * (1 + int(i) % 3) for i in ids)


def test_stop_strings_cut_exactly(model):
    tokenizer = _Letters()
    free = _run(model, rng=6, temperature=1.0)
    texts = [tokenizer.decode(free.tokens[r, : free.lengths[r]]) for r in range(6)]
    row = max(range(6), key=lambda r: len(texts[r]))
    stop = texts[row][len(texts[row]) // 2 :][:3]
    config, params = model
    result = generate(
        config,
        params,
        prompts_from_ids(PROMPTS, PAD),
        rng=jax.random.key(6),
        options=SamplingOptions(
            max_new_tokens=STEPS, n=N, eos_id=EOS, pad_id=PAD, stop_strings=(stop, "\x00")
        ),
        tokenizer=tokenizer,
    )
    for r in range(6):
        cut = texts[r].find(stop)
        if cut < 0:
            assert result.text[r] == texts[r]
            np.testing.assert_array_equal(result.tokens[r], free.tokens[r])
            continue
        assert result.text[r] == texts[r][:cut] and result.finish_reason[r] == "stop"
        k = int(result.lengths[r])  # the shortest prefix whose text holds the stop string
        assert stop in tokenizer.decode(free.tokens[r, :k])
        assert stop not in tokenizer.decode(free.tokens[r, : k - 1])
        np.testing.assert_array_equal(result.tokens[r, :k], free.tokens[r, :k])
        np.testing.assert_array_equal(result.tokens[r, k:], PAD)
        np.testing.assert_array_equal(result.logprobs[r, k:], 0.0)
    assert (result.finish_reason == "stop").any()


def test_empty_batch_slots_generate_nothing(model):
    config, params = model
    prompts = prompts_from_ids(PROMPTS, PAD)
    prompts["prompt_lengths"][1] = 0
    prompts["prompt_segment_ids"][1] = 0
    result = generate(
        config,
        params,
        prompts,
        rng=jax.random.key(0),
        options=SamplingOptions(max_new_tokens=STEPS, n=N, eos_id=EOS, pad_id=PAD),
    )
    np.testing.assert_array_equal(result.lengths[2:4], 0)
    np.testing.assert_array_equal(result.tokens[2:4], PAD)


def test_over_long_prompt_is_refused_naming_it(model):
    config, params = model
    short = config.replace(max_seq_len=20)
    with pytest.raises(ConfigError, match=r"prompt 2 of the batch: 10 prompt tokens \+ "):
        generate(
            short,
            params,
            prompts_from_ids(PROMPTS, PAD),
            rng=jax.random.key(0),
            options=SamplingOptions(max_new_tokens=11),
        )


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match='unknown sampling option "temprature".*"temperature"'):
        options_from_dict({"temprature": 0.5})
    with pytest.raises(ConfigError, match="top_p=0"):
        options_from_dict({"top_p": 0})
    with pytest.raises(ConfigError, match="temperature=-1"):
        SamplingOptions(temperature=-1)
    opts = options_from_dict({"stop_token_ids": [5, 6], "top_k": 3})
    assert opts.stop_token_ids == (5, 6) and opts.top_k == 3


def test_bad_generate_input_is_named(model):
    config, params = model
    prompts = prompts_from_ids(PROMPTS, PAD)
    rng = jax.random.key(0)
    with pytest.raises(ConfigError, match="stop_strings needs a tokenizer"):
        generate(config, params, prompts, rng=rng, options=SamplingOptions(stop_strings=("x",)))
    with pytest.raises(ConfigError, match=r"\[512\] are outside the model's vocabulary"):
        generate(config, params, prompts, rng=rng, options=SamplingOptions(eos_id=512))


def test_gather_to_host0_is_the_identity_on_one_process(model):
    result = _run(model, temperature=0.0)
    assert isinstance(result, GenerateResult)
    assert gather_to_host0(result) is result


def _model1_combine(logps, state, step):
    del step  # the models' caches and positions: not needed to pick model 1
    return logps[1], state


def test_decode_combines_several_models_each_with_its_own_cache(model):
    """Choosing by model 1's log-probs gives model 1's greedy tokens and (T = 0) model 1's
    log-probs as `logprobs`; policy_logprobs stay model 0's (the training path's log-probs of
    model 0 on those tokens)."""
    config, params = model
    other = M.init_params(config, jax.random.key(7))
    other["unembed"]["kernel"] = other["unembed"]["kernel"] * 20.0
    options = SamplingOptions(max_new_tokens=STEPS, n=N, eos_id=EOS, pad_id=PAD, temperature=0.0)
    prompts = prompts_from_ids(PROMPTS, PAD)
    rng = jax.random.key(0)
    both = decode(
        ((config, params), (config, other)), _model1_combine, prompts, rng=rng, options=options
    )
    alone = generate(config, other, prompts, rng=rng, options=options)
    np.testing.assert_array_equal(both.tokens, alone.tokens)
    _, policy = _training_logprobs(model, both, 0.0)
    np.testing.assert_allclose(both.policy_logprobs, policy, atol=TOL, rtol=0)
    np.testing.assert_allclose(both.logprobs, alone.logprobs, atol=TOL, rtol=0)
    assert not np.allclose(both.logprobs, both.policy_logprobs, atol=1e-2)
