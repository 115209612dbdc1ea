"""deita selection (`jaxalign data select`): the greedy score-first diverse selection against a
float64 NumPy reference written from the rule, the similarity sense pinned, the model's
mean-hidden embeddings against per-text forwards, the CLI end to end (atomic output) and its
one-line errors. Selection is discrete: there is no gradient to compare."""

import json
import os

import jax
import numpy as np
import pytest

from jaxalign import cli
from jaxalign import models as M
from jaxalign.checkpoint import save_hf
from jaxalign.data import select

_forward = jax.jit(M.forward, static_argnums=0)
CONFIG = M.PRESETS["tiny-64"]


@pytest.fixture(scope="module")
def params():
    return jax.jit(M.init_params, static_argnums=0)(CONFIG, jax.random.key(0))


def reference_select(score, emb, budget, tau):
    """deita's Repr Filter from the paper's description: pairs (score, -index) sorted high to
    low; a candidate joins when its cosine similarity to each member is below tau."""
    order = sorted(range(len(score)), key=lambda i: (-score[i], i))
    kept = []
    for i in order:
        sims = [
            float(np.dot(emb[i], emb[j]) / (np.linalg.norm(emb[i]) * np.linalg.norm(emb[j])))
            for j in kept
        ]
        if all(s < tau for s in sims):
            kept.append(i)
        if len(kept) == budget:
            break
    return kept


@pytest.mark.parametrize("seed", range(6))
def test_greedy_matches_reference(seed):
    rng = np.random.default_rng(seed)
    N, E = 60, 5
    complexity, quality = rng.uniform(1, 6, N), rng.uniform(1, 6, N)
    complexity[:4] = complexity[4:8]  # ties in score keep file order
    quality[:4] = quality[4:8]
    # clusters of near duplicates, so the threshold bites
    centers = rng.normal(size=(8, E))
    emb = centers[rng.integers(0, 8, N)] + 0.3 * rng.normal(size=(N, E))
    score = complexity * quality
    np.testing.assert_allclose(select.deita_scores(complexity, quality), score, rtol=0, atol=0)
    for tau in (0.5, 0.9, 0.99):
        for budget in (1, 7, 60):
            got = select.greedy_select(score, emb, budget=budget, max_similarity=tau)
            assert got.tolist() == reference_select(score, emb, budget, tau)


def test_similarity_sense():
    """0.9 is a cosine similarity ceiling: a near duplicate (cos 0.95) is dropped, a moderately
    different example (cos 0.5, distance 0.5 < 0.9) is kept."""
    e = np.array([[1.0, 0.0], [0.95, np.sqrt(1 - 0.95**2)], [0.5, np.sqrt(0.75)]])
    kept = select.greedy_select([3.0, 2.0, 1.0], e, budget=3, max_similarity=0.9)
    assert kept.tolist() == [0, 2]


def test_mean_hidden_matches_single_forwards(params):
    config = CONFIG
    rng = np.random.default_rng(0)
    tokens = [rng.integers(4, config.vocab_size, n).tolist() for n in (3, 7)]
    got = select.mean_hidden(config, params, tokens, batch_size=3)  # one padded row
    for row, t in zip(got, tokens, strict=True):
        hidden = np.asarray(_forward(config, params, np.asarray([t], np.int32)), np.float64)
        np.testing.assert_allclose(row, hidden[0].mean(axis=0), rtol=1e-4, atol=1e-5)


def _records(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "prompt": f"What is {10 + i}+{20 + i}?",
            "completion": str(30 + 2 * i),
            "complexity": float(rng.uniform(1, 5)),
            "quality": float(rng.uniform(1, 5)),
            "emb": rng.normal(size=3).round(3).tolist(),
        }
        for i in range(n)
    ]


def test_cli_field_embeddings(write_jsonl, tmp_path, capsys):
    records = _records()
    path = write_jsonl("in.jsonl", records)
    out = tmp_path / "out.jsonl"
    cli.main(["data", "select", "--in", path, "--out", str(out), "--budget", "4",
              "--embedding-field", "emb", "--max-similarity", "0.7"])  # fmt: skip
    score = [r["complexity"] * r["quality"] for r in records]
    want = reference_select(score, np.array([r["emb"] for r in records]), 4, 0.7)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [records[i] for i in want]
    assert "4 of 12 records" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # no temp file left


def test_cli_model_embeddings(params, write_jsonl, tmp_path, demo_dir, demo_tokenizer):
    config = CONFIG
    save_hf(config, params, str(tmp_path / "hf"))
    records = _records()
    path = write_jsonl("in.jsonl", records)
    out = tmp_path / "out.jsonl"
    cli.main(["data", "select", "--in", path, "--out", str(out), "--budget", "5",
              "--model", f"hf:{tmp_path / 'hf'}",
              "--tokenizer", str(demo_dir / "tokenizer.model")])  # fmt: skip
    tokens = [demo_tokenizer.encode(r["prompt"] + "\n" + r["completion"]) for r in records]
    emb = np.stack(
        [
            np.asarray(_forward(config, params, np.asarray([t], np.int32)))[0].mean(axis=0)
            for t in tokens
        ]
    )
    score = [r["complexity"] * r["quality"] for r in records]
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert kept == [records[i] for i in reference_select(score, emb, 5, 0.9)]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "in.jsonl line 2: not JSON"),
        ({"complexity": 1.0, "emb": [1.0, 2.0, 3.0]}, 'line 2: field "quality" is missing'),
        ({"complexity": "high", "quality": 1.0, "emb": [1.0]}, "field \"complexity\" is 'high'"),
        ({"complexity": 1.0, "quality": 1.0, "emb": [1.0, 2.0]}, 'field "emb" is not a list of 3'),
    ],
)
def test_bad_records_one_line(write_jsonl, tmp_path, capsys, line, message):
    good = {"complexity": 1.0, "quality": 2.0, "emb": [1.0, 0.0, 0.0]}
    path = write_jsonl("in.jsonl", [good, line])
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "select", "--in", path, "--out", str(out), "--budget", "1",
                  "--embedding-field", "emb"])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxalign: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_options(write_jsonl, tmp_path, capsys):
    path = write_jsonl("in.jsonl", _records(3))
    for flags, message in (
        (["--budget", "0", "--embedding-field", "emb"], "--budget 0"),
        (["--budget", "1", "--embedding-field", "emb", "--max-similarity", "2"], "[-1, 1]"),
        (["--budget", "1"], "one of --embedding-field and --model"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(["data", "select", "--in", path, "--out", str(tmp_path / "o.jsonl"), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err
