"""The R3 preference-free reward against a plain-Python reference written from its definition."""

import math
import random

import pytest

from jaxalign.errors import DataError
from jaxalign.rl import rewards as R


def ref_r3(prompt, completion):
    def words(t):
        out, cur = [], ""
        for ch in t.lower():
            if ch.isalnum() or ch == "_":
                cur += ch
            elif cur:
                out.append(cur)
                cur = ""
        return out + ([cur] if cur else [])

    x, y = words(prompt), words(completion)
    vocab = sorted(set(x) | set(y))
    vx = [x.count(w) for w in vocab]
    vy = [y.count(w) for w in vocab]
    nx, ny = math.sqrt(sum(a * a for a in vx)), math.sqrt(sum(b * b for b in vy))
    rel = sum(a * b for a, b in zip(vx, vy, strict=True)) / (nx * ny) if nx and ny else 0.0
    tri = [tuple(y[i : i + 3]) for i in range(len(y) - 2)]
    uniq = len(set(tri)) / len(tri) if tri else 1.0
    return len(y) / 100 * rel * uniq


def test_r3_matches_the_reference_on_random_texts():
    rng = random.Random(0)
    vocab = ["the", "sum", "of", "two", "numbers", "is", "answer", "42", "cat", "Sum"]
    (spec,) = R.rewards_from_config((("r3", 1.0),))
    for _ in range(50):
        prompt = " ".join(rng.choice(vocab) for _ in range(rng.randrange(0, 8)))
        completion = ", ".join(rng.choice(vocab) for _ in range(rng.randrange(0, 30)))
        got = spec.fn({"prompt": prompt}, completion)
        assert got == pytest.approx(ref_r3(prompt, completion), rel=1e-12, abs=1e-15)


def test_r3_pins_its_choices():
    r3 = R.r3_reward()
    # 4 words, all prompt words: relevance cos([1,1,1,1],[1,1,1,1]) = 1, trigrams unique.
    assert r3({"prompt": "what is the sum"}, "What is the sum") == pytest.approx(0.04)
    # Repetition: "a b a b a b" has trigrams aba, bab, aba, bab: 2 unique of 4.
    assert r3({"prompt": "a b"}, "a b a b a b") == pytest.approx(6 / 100 * 1.0 * 0.5)
    assert r3({"prompt": "cats"}, "dogs bark") == 0.0  # off topic
    assert r3({"prompt": ""}, "anything") == 0.0  # no prompt words


def test_r3_in_rl_rewards_and_bad_records():
    specs = R.rewards_from_config((("r3", 2.0),))
    total, per_fn = R.score_rule_rewards(specs, [{"prompt": "the sum"}], ["the sum is 4"], 0)
    assert per_fn["r3"][0] == pytest.approx(ref_r3("the sum", "the sum is 4"), rel=1e-6)
    assert total[0] == pytest.approx(2 * per_fn["r3"][0], rel=1e-6)
    with pytest.raises(DataError, match='reward "r3" failed on record 0'):
        R.score_rule_rewards(specs, [{"answer": "4"}], ["4"], 0)
