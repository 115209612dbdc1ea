"""Write the bundled demo task data and tokenizer (deterministic).

    python tools/make_demo_data.py            # -> data/demo/
    python tools/make_demo_data.py --out DIR --seed 0 --vocab-size 256

See `jaxalign.data.demo_task` for the task (two-digit arithmetic, near-miss rejected answers, a
judge).
"""

from __future__ import annotations

import argparse
import os

from jaxalign.data.demo_task import write_demo_data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="data/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=256)
    args = parser.parse_args()
    paths = write_demo_data(args.out, seed=args.seed, vocab_size=args.vocab_size)
    for name, path in paths.items():
        print(f"{name:16s} {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
