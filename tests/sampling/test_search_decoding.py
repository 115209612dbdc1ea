"""Search-time decoding on tiny random models against a direct reference: for every row and step,
the policy's full forward on the generated prefix and the value model's full forward on the
prefix followed by each of its top-k candidates (right-padded, no cache), scores
l(c) + alpha V(c) in float64 NumPy, then the greedy token, the candidate set and the per-step
log-probs compared with what the loop returned (left-padded prompts of different lengths, n = 2)."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from jaxalign import cli
from jaxalign import models as M
from jaxalign.checkpoint import manager as ckpt
from jaxalign.config import apply_overrides, load_config, to_dict
from jaxalign.errors import ConfigError
from jaxalign.models import heads
from jaxalign.sampling import SamplingOptions, generate, prompts_from_ids
from jaxalign.sampling.search import search

STEPS, N, K = 6, 2, 4
PAD, EOS = 3, 2
PROMPTS = [[1, 45, 12, 99, 7], [1, 300, 301], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
# The scores are float32 log-probs (|l| < ~40 here) plus alpha V: rounding up to a few 1e-6.
TOL = 1e-5
NEAR_TIE = 1e-4  # a step whose deciding scores are closer may go either way in float32
ALPHA = 2.0


def _model(seed, scale):
    config = M.get_preset("tiny-64")
    params = M.init_params(config, jax.random.key(seed))
    params["unembed"]["kernel"] = params["unembed"]["kernel"] * scale
    return config, params


@pytest.fixture(scope="module")
def policy():
    return _model(0, 8.0)


@pytest.fixture(scope="module")
def value():
    config, params = _model(1, 1.0)
    head = heads.init_scalar_head(config)
    head["kernel"] = 0.3 * jax.random.normal(jax.random.key(7), head["kernel"].shape)
    head["bias"] = head["bias"] + 0.5
    return config, params | {heads.VALUE_HEAD: head}


_forward = jax.jit(M.forward, static_argnums=0)


def _sequences(result):
    """Per row and step: the prompt + completion prefix before that step's token."""
    return [
        [PROMPTS[result.prompt_index[r]] + result.tokens[r, :t].tolist() for t in range(STEPS)]
        for r in range(result.tokens.shape[0])
    ]


def _last_hidden(config, params, seqs):
    """float64 final hidden state at the last token of each sequence (one right-padded forward)."""
    T = max(map(len, seqs))
    tokens, segments = np.zeros((len(seqs), T), np.int32), np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], segments[i, : len(s)] = s, 1
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)
    hidden = np.asarray(_forward(config, params, tokens, positions, segments), np.float64)
    return hidden[np.arange(len(seqs)), [len(s) - 1 for s in seqs]]


def _logsumexp(x):
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def _reference(policy, value, result, alpha, k):
    """(policy log-probs [R, STEPS, V], candidates [R, STEPS, k], scores [R, STEPS, k]) in
    float64, from full forwards of every prefix and every prefix + candidate."""
    (pc, pp), (vc, vp) = policy, value
    prefixes = _sequences(result)
    R = len(prefixes)
    flat = [s for row in prefixes for s in row]
    z = _last_hidden(pc, pp, flat) @ np.asarray(M.unembedding(pc, pp), np.float64)
    logps = (z - _logsumexp(z)).reshape(R, STEPS, -1)
    candidates = np.argsort(-logps, axis=-1, kind="stable")[..., :k]
    extended = [
        s + [int(c)] for s, cs in zip(flat, candidates.reshape(-1, k), strict=True) for c in cs
    ]
    hidden = _last_hidden(vc, heads.decoder_params(vp), extended)
    head = vp[heads.VALUE_HEAD]
    kernel = np.asarray(head["kernel"], np.float64)[:, 0]
    v = (hidden @ kernel + float(head["bias"][0])).reshape(R, STEPS, k)
    scores = np.take_along_axis(logps, candidates, -1) + alpha * v
    return logps, candidates, scores


def _options(**kw):
    return SamplingOptions(**(dict(max_new_tokens=STEPS, n=N, eos_id=EOS, pad_id=PAD) | kw))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_search_equals_full_forwards_per_candidate(policy, value, temperature):
    result = search(
        policy,
        value,
        prompts_from_ids(PROMPTS, PAD),
        alpha=ALPHA,
        k=K,
        rng=jax.random.key(3),
        options=_options(temperature=temperature),
    )
    logps, candidates, scores = _reference(policy, value, result, ALPHA, K)
    mask = np.arange(STEPS)[None] < result.lengths[:, None]
    y = result.tokens
    # A step is decided cleanly when the policy's k-th and (k+1)-th log-probs and (greedy) the
    # two best scores are apart; up to a row's first near-tie the tokens must match exactly.
    ranked = -np.sort(-logps, -1)
    near = ranked[..., K - 1] - ranked[..., K] < NEAR_TIE
    if temperature == 0:
        top2 = np.sort(scores, -1)[..., -2:]
        near |= top2[..., 1] - top2[..., 0] < NEAR_TIE
    upto = mask & (np.cumsum(mask & near, axis=1) == 0)
    assert upto[:, 0].all() and upto.sum() >= 0.9 * mask.sum()
    in_set = (candidates == y[..., None]).any(-1)
    assert in_set[upto].all()  # every token is one of the policy's top k
    if temperature == 0:
        best = np.take_along_axis(candidates, scores.argmax(-1)[..., None], -1)[..., 0]
        np.testing.assert_array_equal(np.where(upto, y, -1), np.where(upto, best, -1))
    # logprobs: log_softmax(s / T)[y] over the k candidates (T = 0: log_softmax(s)).
    scaled = scores / (temperature or 1.0)
    chosen = np.where(candidates == y[..., None], scaled, -np.inf).max(-1)
    expected = chosen - _logsumexp(scaled)[..., 0]
    np.testing.assert_allclose(
        np.where(upto, result.logprobs, 0), np.where(upto, expected, 0), atol=TOL, rtol=0
    )
    policy_lp = np.take_along_axis(logps, np.where(mask, y, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        np.where(upto, result.policy_logprobs, 0), np.where(upto, policy_lp, 0), atol=TOL, rtol=0
    )
    # The value term changes decisions: not every greedy token is the policy's argmax.
    if temperature == 0:
        assert (np.where(upto, y, -1) != np.where(upto, logps.argmax(-1), -1)).any()


def test_alpha_zero_is_the_policy_greedy_decode(policy, value):
    prompts = prompts_from_ids(PROMPTS, PAD)
    options = _options(temperature=0.0)
    searched = search(
        policy, value, prompts, alpha=0.0, k=K, rng=jax.random.key(0), options=options
    )
    plain = generate(*policy, prompts, rng=jax.random.key(0), options=options)
    np.testing.assert_array_equal(searched.tokens, plain.tokens)
    np.testing.assert_allclose(searched.policy_logprobs, plain.policy_logprobs, atol=1e-6)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(k=0), "k=0: expected a number of candidates"),
        (dict(k=513), "k=513: expected a number of candidates"),
        (dict(alpha=float("nan")), "alpha=nan: expected a finite number"),
        (dict(head="critic"), "head='critic': expected one of value_head, reward_head"),
        (dict(head="reward_head"), 'the value model has no "reward_head"'),
    ],
)
def test_bad_search_settings_raise_config_errors(policy, value, kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        search(
            policy,
            value,
            prompts_from_ids(PROMPTS, PAD),
            rng=jax.random.key(0),
            options=_options(),
            **kw,
        )


ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "data/demo/tokenizer.model")
PROMPT_FILE = ROOT / "data/demo/prompts_eval.jsonl"


def _run_dir(workdir, model):
    """A run directory at step 0 of the SFT tiny config holding ``model``'s params (a value
    model's with its head)."""
    config = apply_overrides(
        load_config(f"{ROOT / 'configs/sft/tiny.py'}:smoke=True"), [f"tokenizer={TOKENIZER}"]
    )
    model_config, params = model
    manager = ckpt.make_manager(workdir, async_save=False)
    record = to_dict(config) | {"model_config": dataclasses.asdict(model_config)}
    ckpt.save(manager, 0, {"step": np.int32(0), "params": params}, {"next_index": 0}, record)
    manager.close()
    return f"checkpoint:{workdir}"


def _generate(capsys, *argv):
    try:
        cli.main([str(a) for a in argv])
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def test_generate_config_search(policy, value, tmp_path, capsys):
    """`jaxalign generate --config configs/generate/search.py`: alpha 0 writes the policy's own
    greedy completions; alpha 2 changes some; a bad head is one line, exit 2."""
    run_policy, run_value = _run_dir(tmp_path / "p", policy), _run_dir(tmp_path / "v", value)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(PROMPT_FILE.read_text().splitlines(keepends=True)[:4]))
    common = ["generate", "--prompts", prompts, "--max_new_tokens", 5, "--temperature", 0]
    alone = tmp_path / "alone.jsonl"
    assert _generate(capsys, *common, "--out", alone, "--model", run_policy)[0] == 0
    search_flags = [
        "--config",
        ROOT / "configs/generate/search.py",
        f"--config.models.policy={run_policy}",
        f"--config.models.value={run_value}",
        "--config.head=value_head",
    ]
    outs = {}
    for alpha in (0.0, 2.0):
        outs[alpha] = tmp_path / f"search{alpha}.jsonl"
        flags = [*search_flags, f"--config.alpha={alpha}"]
        status, err = _generate(capsys, *common, "--out", outs[alpha], *flags)
        assert status == 0, err
    lines = {k: [json.loads(x) for x in v.read_text().splitlines()] for k, v in outs.items()}
    want = [json.loads(x) for x in alone.read_text().splitlines()]
    assert [x["method"] for x in lines[0.0]] == ["search"] * 4
    assert [x["completion"] for x in lines[0.0]] == [x["completion"] for x in want]
    assert [x["completion"] for x in lines[2.0]] != [x["completion"] for x in want]
    bad = tmp_path / "bad.jsonl"
    status, err = _generate(
        capsys, *common, "--out", bad, *search_flags, "--config.head=reward_head"
    )
    assert status == 2 and err.startswith("jaxalign: ") and err.count("\n") == 1, err
    assert "reward_head" in err and not bad.exists()
