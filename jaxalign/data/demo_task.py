"""The bundled demo task: two-digit arithmetic with a programmatic judge.

Prompts are ``"What is 23+58?"`` / ``"What is 71-19?"`` (both operands in 10..99, subtraction never
goes below zero). The correct response is the number (``"81"``); a rejected response is a near miss:
off by 1, off by 10, or the answer's digits swapped. `judge(prompt, response)` returns 1.0 for a
correct response and 0.0 otherwise; it is the reward for RL on this task.

`generate_demo_records(seed)` is deterministic given the seed; `write_demo_data(out_dir)` writes the
files under ``data/demo`` (see `tools/make_demo_data.py`), including a SentencePiece tokenizer
trained on a bundled corpus (vocab <= 512, digits split, no byte fallback, ids unk=0 bos=1 eos=2
pad=3).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re

PROMPT_FORMAT = "What is {a}{op}{b}?"
_PROMPT_RE = re.compile(r"What is (\d+)\s*([+-])\s*(\d+)\?")
_ANSWER_RE = re.compile(r"\s*(-?\d+)\s*\.?\s*")

# Split sizes written by `write_demo_data`; the eval prompts are disjoint from the training prompts.
SPLITS = {
    "sft_train": 2000,
    "pairs_train": 2000,
    "pairs_eval": 200,
    "unpaired_train": 2000,
    "prompts_eval": 200,
}


def make_prompt(a: int, op: str, b: int) -> str:
    """The prompt text for ``a op b``."""
    return PROMPT_FORMAT.format(a=a, op=op, b=b)


def parse_prompt(prompt: str) -> tuple[int, str, int]:
    """``(a, op, b)`` from a demo prompt; ValueError if it is not one."""
    m = _PROMPT_RE.search(prompt)
    if m is None:
        raise ValueError(f"not a demo arithmetic prompt: {prompt!r}")
    return int(m.group(1)), m.group(2), int(m.group(3))


def solve(prompt: str) -> int:
    """The correct answer to a demo prompt."""
    a, op, b = parse_prompt(prompt)
    return a + b if op == "+" else a - b


def judge(prompt: str, response: str) -> float:
    """1.0 if `response` is exactly the right number (spaces / a final "." allowed), else 0.0."""
    m = _ANSWER_RE.fullmatch(response)
    if m is None:
        return 0.0
    return 1.0 if int(m.group(1)) == solve(prompt) else 0.0


def near_miss(answer: int, rng: random.Random) -> int:
    """A wrong answer near `answer`: +-1, +-10 or the digits swapped; never negative."""
    cands = {answer + 1, answer - 1, answer + 10, answer - 10}
    digits = str(answer)
    if len(digits) >= 2:
        swapped = digits[:-2] + digits[-1] + digits[-2]
        if swapped[0] != "0":
            cands.add(int(swapped))
    cands = sorted(c for c in cands if c >= 0 and c != answer)
    return rng.choice(cands)


def _all_problems() -> list[tuple[int, str, int]]:
    probs = []
    for a in range(10, 100):
        for b in range(10, 100):
            probs.append((a, "+", b))
            if a >= b:
                probs.append((a, "-", b))
    return probs


def generate_demo_records(
    seed: int = 0, sizes: dict[str, int] | None = None
) -> dict[str, list[dict]]:
    """All demo splits as lists of records (deterministic in `seed`).

    Records: ``sft_train`` {prompt, completion}; ``pairs_train`` / ``pairs_eval`` {prompt, chosen,
    rejected}; ``unpaired_train`` {prompt, completion, label} (half correct, half near misses);
    ``prompts_eval`` {prompt, answer}; ``sft_eval`` {prompt, completion} (the same prompts as
    ``prompts_eval``). Evaluation prompts never occur in any training split.
    """
    sizes = dict(SPLITS if sizes is None else sizes)
    rng = random.Random(seed)
    probs = _all_problems()
    rng.shuffle(probs)
    n_eval = sizes["pairs_eval"] + sizes["prompts_eval"]
    eval_probs, train_probs = probs[:n_eval], probs[n_eval:]

    def take(pool, n):
        return [pool[rng.randrange(len(pool))] for _ in range(n)]

    out: dict[str, list[dict]] = {}
    out["sft_train"] = [
        {"prompt": make_prompt(*p), "completion": str(solve(make_prompt(*p)))}
        for p in take(train_probs, sizes["sft_train"])
    ]
    for split, pool in (
        ("pairs_train", take(train_probs, sizes["pairs_train"])),
        ("pairs_eval", eval_probs[: sizes["pairs_eval"]]),
    ):
        recs = []
        for p in pool:
            prompt = make_prompt(*p)
            ans = solve(prompt)
            recs.append(
                {"prompt": prompt, "chosen": str(ans), "rejected": str(near_miss(ans, rng))}
            )
        out[split] = recs
    recs = []
    for i, p in enumerate(take(train_probs, sizes["unpaired_train"])):
        prompt = make_prompt(*p)
        ans = solve(prompt)
        good = i % 2 == 0
        recs.append(
            {
                "prompt": prompt,
                "completion": str(ans if good else near_miss(ans, rng)),
                "label": good,
            }
        )
    out["unpaired_train"] = recs
    out["prompts_eval"] = [
        {"prompt": make_prompt(*p), "answer": str(solve(make_prompt(*p)))}
        for p in eval_probs[sizes["pairs_eval"] :]
    ]
    # Held-out SFT split: the evaluation prompts with their right answers.
    out["sft_eval"] = [
        {"prompt": r["prompt"], "completion": r["answer"]} for r in out["prompts_eval"]
    ]
    return out


_WORDS = {"+": ("plus", "sum"), "-": ("minus", "difference")}


def demo_corpus(seed: int = 0, n_lines: int = 3000) -> str:
    """A small text corpus for the demo tokenizer: prompts, answers, arithmetic sentences."""
    rng = random.Random(seed + 1)
    probs = _all_problems()
    lines = [
        "Arithmetic is the part of mathematics about numbers and the operations on them.",
        "Addition puts two numbers together; subtraction takes one number away from another.",
        "The answer to a question is a number written with digits.",
        "Think step by step, then give the final answer.",
    ]
    for _ in range(n_lines):
        a, op, b = probs[rng.randrange(len(probs))]
        prompt = make_prompt(a, op, b)
        ans = solve(prompt)
        word, noun = _WORDS[op]
        form = rng.randrange(4)
        if form == 0:
            lines.append(f"{prompt}\n{ans}")
        elif form == 1:
            lines.append(f"{a} {word} {b} is {ans}.")
        elif form == 2:
            lines.append(f"The {noun} of {a} and {b} is {ans}.")
        else:
            lines.append(f"{prompt} The answer is {ans}.")
    return "\n".join(lines) + "\n"


def train_sentencepiece(corpus_path: str, model_path: str, vocab_size: int = 256) -> None:
    """Train a SentencePiece BPE model on `corpus_path` and write it to `model_path` (``.model``).

    Settings: digits split (every number is a digit sequence), no byte fallback, identity
    normalisation (newlines and spaces kept as written), ids unk=0 bos=1 eos=2 pad=3, one thread
    (deterministic). ``hard_vocab_limit=False`` lets a small corpus give a smaller vocabulary than
    asked.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=corpus_path,
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        split_digits=True,
        byte_fallback=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    _atomic_write(model_path, buf.getvalue())


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


RATING_OBJECTIVES = ("helpfulness", "verbosity")


def _ratings(good: bool, verbosity: float) -> list[float]:
    return [(1.0 - verbosity / 2) if good else 0.0, verbosity]


def _styles(a: int, op: str, b: int, said: int) -> tuple[str, str, str]:
    """A response in three styles of verbosity 0, 0.5 and 1."""
    return (
        str(said),
        f"The answer is {said}.",
        f"{a} {_WORDS[op][0]} {b} is {said}. The answer is {said}.",
    )


def ratings_records(seed: int = 0, n: int = 1000) -> list[dict]:
    """Rated responses for a multi-objective reward model (deterministic in `seed`, its own random
    stream): ``{prompt, response, ratings: [helpfulness, verbosity]}``. The response is the right
    answer or a near miss in one of three styles of growing verbosity s (0.0 "112", 0.5 "The
    answer is 112.", 1.0 "92 plus 20 is 112. The answer is 112."); helpfulness is 1 - s / 2 for
    a right answer (the two objectives conflict, as in DPA), 0 for a near miss. Training prompts
    only."""
    rng = random.Random(f"ratings-{seed}")
    probs = _all_problems()
    records = []
    for _ in range(n):
        a, op, b = probs[rng.randrange(len(probs))]
        prompt = make_prompt(a, op, b)
        ans = solve(prompt)
        good = rng.random() < 0.5
        said = ans if good else near_miss(ans, rng)
        style = rng.randrange(3)
        response = _styles(a, op, b, said)[style]
        records.append(
            {"prompt": prompt, "response": response, "ratings": _ratings(good, style / 2)}
        )
    return records


def directional_sft_records(seed: int = 0, n: int = 1000) -> list[dict]:
    """Direction-conditioned SFT records (DPA): ``{prompt, completion, direction: [v1, v2]}``, v
    a random unit direction in the positive quadrant of (helpfulness, verbosity) and the
    completion the right answer in the style that maximises v . ratings (`ratings_records`):
    terse for helpfulness-leaning directions, verbose for verbosity-leaning ones."""
    rng = random.Random(f"directions-{seed}")
    probs = _all_problems()
    records = []
    for _ in range(n):
        a, op, b = probs[rng.randrange(len(probs))]
        ans = solve(make_prompt(a, op, b))
        angle = rng.uniform(0.0, math.pi / 2)
        v = [round(math.cos(angle), 3), round(math.sin(angle), 3)]
        scores = [
            sum(x * y for x, y in zip(v, _ratings(True, s / 2), strict=True)) for s in range(3)
        ]
        best = max(range(3), key=scores.__getitem__)
        completion = _styles(a, op, b, ans)[best]
        records.append({"prompt": make_prompt(a, op, b), "completion": completion, "direction": v})
    return records


def write_demo_data(out_dir: str, seed: int = 0, vocab_size: int = 256) -> dict[str, str]:
    """Write ``<split>.jsonl`` files, ``corpus.txt`` and ``tokenizer.model`` to `out_dir`.

    Returns {name: path}. Each file is written to a temporary path and renamed.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    splits = generate_demo_records(seed) | {
        "ratings_train": ratings_records(seed),
        "directional_sft": directional_sft_records(seed),
    }
    for split, recs in splits.items():
        path = os.path.join(out_dir, f"{split}.jsonl")
        _atomic_write(path, "".join(json.dumps(r) + "\n" for r in recs).encode())
        paths[split] = path
    corpus = os.path.join(out_dir, "corpus.txt")
    _atomic_write(corpus, demo_corpus(seed).encode())
    paths["corpus"] = corpus
    paths["tokenizer"] = os.path.join(out_dir, "tokenizer.model")
    train_sentencepiece(corpus, paths["tokenizer"], vocab_size)
    return paths
