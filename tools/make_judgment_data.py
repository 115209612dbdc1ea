"""Write the demo records of CUT, AFT and Re-Align from the bundled demo pairs (deterministic).

    python tools/make_judgment_data.py        # data/demo/pairs_train.jsonl -> data/demo/*.jsonl

- judgments_train.jsonl (CUT): ``{prompt, response, judgment}``; even records the near-miss
  answer judged "wrong, the answer is <right>.", odd records the right answer judged "correct."
  (words the demo tokenizer spells; it has no "J" or ":", so the judgment prefix it reads as
  unknown tokens).
- aft_train.jsonl (AFT): ``{prompt, correct: [2], incorrect: [2]}``; correct chains the right
  answer, terse and as "The answer is <right>."; incorrect chains the pair's near miss (terse)
  and "The answer is <another near miss>.".
- contrast_train.jsonl (Re-Align): the pairs with ``contrast_prompt``, the next pair's prompt (the
  last record's: the first one's), a context under which the chosen answer is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random

from jaxalign.data.demo_task import near_miss, solve

RECORDS = 256


def judgments(pairs: list[dict]) -> list[dict]:
    out = []
    for i, p in enumerate(pairs):
        if i % 2 == 0:
            judgment = f"wrong, the answer is {p['chosen']}."
            out.append({"prompt": p["prompt"], "response": p["rejected"], "judgment": judgment})
        else:
            out.append({"prompt": p["prompt"], "response": p["chosen"], "judgment": "correct."})
    return out


def ranked(pairs: list[dict], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for p in pairs:
        answer = solve(p["prompt"])
        other = near_miss(answer, rng)
        while other == int(p["rejected"]):
            other = near_miss(answer, rng)
        correct = [str(answer), f"The answer is {answer}."]
        incorrect = [p["rejected"], f"The answer is {other}."]
        out.append({"prompt": p["prompt"], "correct": correct, "incorrect": incorrect})
    return out


def contrasts(pairs: list[dict]) -> list[dict]:
    return [
        p | {"contrast_prompt": pairs[(i + 1) % len(pairs)]["prompt"]} for i, p in enumerate(pairs)
    ]


def _write(path: pathlib.Path, records: list[dict]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--demo", default="data/demo")
    args = parser.parse_args()
    demo = pathlib.Path(args.demo)
    lines = (demo / "pairs_train.jsonl").read_text().splitlines()[:RECORDS]
    pairs = [json.loads(line) for line in lines]
    outputs = (
        ("judgments_train.jsonl", judgments(pairs)),
        ("contrast_train.jsonl", contrasts(pairs)),
        ("aft_train.jsonl", ranked(pairs)),
    )
    for name, records in outputs:
        _write(demo / name, records)
        print(f"{demo / name} ({len(records)} records)")


if __name__ == "__main__":
    main()
