"""SVD-based merges against task arithmetic on one random [n, n] tensor and three fine-tunes
(``base + 0.02 N(0, 1)``), in one process: warm seconds per merge (mean of ``--repeats``) and
the ratios to ``tsv``.

    .venv/bin/python benchmarks/merge_svd.py --size 512
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

from jaxalign.merge import r_tsvm, task_arithmetic, tsv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.size, args.size)
    base = jnp.asarray(rng.normal(size=shape), jnp.float32)
    xs = [base + 0.02 * jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3)]
    w = (1.0, 1.0, 1.0)
    merges = {
        "task_arithmetic": lambda: task_arithmetic(base, xs, w),
        "tsv": lambda: tsv(base, xs, w),
        "r_tsvm": lambda: r_tsvm(base, xs, w),
    }
    seconds = {}
    for name, merge in merges.items():
        merge().block_until_ready()  # compile
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            merge().block_until_ready()
            times.append(time.perf_counter() - start)
        seconds[name] = float(np.mean(times))
    for name, s in seconds.items():
        print(f"{name:16s} {s * 1e3:10.1f} ms  {s / seconds['tsv']:6.3f} x tsv")


if __name__ == "__main__":
    main()
