"""Greedy generation equals transformers' greedy `generate`, token for token.

Tiny random Llama, Mistral (sliding window 4, shorter than every sequence), Qwen2 (tied, q/k/v
bias) and Qwen3 (q/k norm) models in float32, converted with `load_hf`; a left-padded batch of
prompts of different lengths, and an EOS id taken from transformers' own greedy output so that
a row stops early (EOS included in the completion, the row padded after it).

Near-ties: where a row's two largest logits (transformers' raw logits) are within 1e-5 at some
step, float rounding may legitimately pick either token; that row is compared only up to that
step, and the number of such steps is printed. Never a tolerance: the compared tokens must be
equal.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxalign.checkpoint.hf import load_hf  # noqa: E402
from jaxalign.sampling import SamplingOptions, generate, prompts_from_ids  # noqa: E402

pytestmark = pytest.mark.hf

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
CASES = {
    "llama": lambda: transformers.LlamaConfig(**TINY, rms_norm_eps=1e-5),
    "mistral_window": lambda: transformers.MistralConfig(**TINY, sliding_window=4),
    "qwen2_tied": lambda: transformers.Qwen2Config(
        **TINY, rope_theta=1e6, tie_word_embeddings=True, attention_bias=True
    ),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=32, rope_theta=1e6),
}
PAD = 255
STEPS = 20
NEAR_TIE = 1e-5
LENGTHS = [7, 3, 12, 5]


def _hf_model(hf_config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():  # random norms and biases too, so nothing hides behind an identity
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
    return model.eval()


def _prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, PAD, n).tolist() for n in LENGTHS]


def _hf_greedy(model, prompts, eos, **kwargs):
    """transformers' greedy completions [B, STEPS] (PAD after the end) and raw logits [B, s, V]."""
    batch = prompts_from_ids(prompts, PAD)
    out = model.generate(
        input_ids=torch.from_numpy(batch["prompt_tokens"].astype(np.int64)),
        attention_mask=torch.from_numpy(batch["prompt_segment_ids"].astype(np.int64)),
        max_new_tokens=STEPS,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=PAD,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    new = out.sequences[:, batch["prompt_tokens"].shape[1] :].numpy()
    tokens = np.full((len(prompts), STEPS), PAD, np.int64)
    tokens[:, : new.shape[1]] = new
    logits = torch.stack(out.logits, dim=1).float().numpy()
    return tokens, logits


def _compare(ours, hf_tokens, hf_logits, eos):
    """Compares row by row up to each row's end or first near-tie; returns (near-ties, compared
    tokens, total tokens)."""
    top2 = np.sort(hf_logits, axis=-1)[..., -2:]
    tie = (top2[..., 1] - top2[..., 0]) < NEAR_TIE  # [B, s]
    near_ties = compared = total = 0
    for b in range(hf_tokens.shape[0]):
        hf_row = hf_tokens[b]
        hits = np.flatnonzero(hf_row == eos) if eos is not None else []
        end = int(hits[0]) + 1 if len(hits) else STEPS
        total += end
        first_tie = next((s for s in range(min(end, tie.shape[1])) if tie[b, s]), None)
        if first_tie is not None:
            near_ties += 1
            end = first_tie
        else:
            assert ours.lengths[b] == end, (b, ours.lengths[b], end)
            want_reason = "stop" if len(hits) else "length"
            assert ours.finish_reason[b] == want_reason
            np.testing.assert_array_equal(ours.tokens[b, end:], PAD)
        np.testing.assert_array_equal(ours.tokens[b, :end], hf_row[:end], err_msg=f"row {b}")
        compared += end
    return near_ties, compared, total


@pytest.fixture(scope="module")
def convert(tmp_path_factory):
    """case -> (transformers model, config, params), each built once per module."""
    built = {}

    def get(name):
        if name not in built:
            model = _hf_model(CASES[name]())
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            built[name] = (model, *load_hf(directory))
        return built[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_equals_transformers_with_left_padding_and_early_eos(convert, name):
    model, config, params = convert(name)
    prompts = _prompts()
    free, _ = _hf_greedy(model, prompts, eos=None)
    eos = int(free[1, 4])  # a token greedy emits: row 1 stops at step <= 4
    hf_tokens, hf_logits = _hf_greedy(model, prompts, eos=eos)
    ours = generate(
        config,
        params,
        prompts_from_ids(prompts, PAD),
        rng=jax.random.key(0),
        options=SamplingOptions(max_new_tokens=STEPS, temperature=0.0, eos_id=eos, pad_id=PAD),
    )
    near_ties, compared, total = _compare(ours, hf_tokens, hf_logits, eos)
    print(f"{name}: compared {compared}/{total} tokens, near-ties {near_ties}")
    assert ours.finish_reason[1] == "stop" and ours.lengths[1] <= 5
    assert compared >= 0.75 * total


def test_greedy_with_repetition_penalty_equals_transformers(convert):
    """CTRL penalty on raw logits, prompt tokens included (Llama; the penalty does not depend on
    the family). Same-length prompts: transformers also penalises padding, jaxalign does not."""
    name = "llama"
    model, config, params = convert(name)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, PAD, 6).tolist() for _ in range(3)]
    hf_tokens, hf_logits = _hf_greedy(model, prompts, eos=None, repetition_penalty=1.5)
    ours = generate(
        config,
        params,
        prompts_from_ids(prompts, PAD, buckets=[6]),
        rng=jax.random.key(0),
        options=SamplingOptions(
            max_new_tokens=STEPS, temperature=0.0, repetition_penalty=1.5, pad_id=PAD
        ),
    )
    # The near-tie check needs the penalised logits; recompute transformers' processing.
    processor = transformers.RepetitionPenaltyLogitsProcessor(1.5)
    seqs = np.concatenate([np.array(prompts), hf_tokens], axis=1)
    processed = np.stack(
        [
            processor(torch.from_numpy(seqs[:, : 6 + s]), torch.from_numpy(hf_logits[:, s])).numpy()
            for s in range(STEPS)
        ],
        axis=1,
    )
    near_ties, compared, total = _compare(ours, hf_tokens, processed, None)
    print(f"{name} repetition_penalty: compared {compared}/{total} tokens, near-ties {near_ties}")
    assert compared >= 0.75 * total
