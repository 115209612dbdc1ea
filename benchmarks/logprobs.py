"""Token log-prob and KL kernels vs the naive path: compiled temporary memory and time.

    .venv/bin/python benchmarks/logprobs.py          # CPU, f32: N=1024 D=256 V=32768, then
                                                     #   N=2048 D=512 V=65536
    .venv/bin/python benchmarks/logprobs.py --quick  # CPU: the first shape only
    python benchmarks/logprobs.py --gpu              # GPU: N=8192 D=4096 V=131072 bf16, TFLOP/s

Compared side by side in one process (these machines are noisy):

- ``naive``: full logits, ``log_softmax``, gather (what a straightforward trainer does);
- ``chunked``: a ``jax.checkpoint``-ed ``lax.scan`` over token chunks, full logits per chunk
  (the Tunix-style rematerialised scan);
- every jaxalign implementation that runs on this backend, and the first of them again with the
  Gemma 2 final-logit soft-cap (``softcap=30``) to show what capping each tile costs.

Memory is ``temp_size_in_bytes`` from ``jax.jit(f).lower(...).compile().memory_analysis()``. Time is
the median over interleaved repetitions (each repetition runs every variant once, in turn), shown as
a ratio to ``naive``. "fwd" returns the ``[N]`` log-probs; "fwd+bwd" is ``jax.value_and_grad`` of
``sum(w * logp)`` w.r.t. hidden and unembedding. Matmul FLOPs: forward 2NDV; fwd+bwd 6NDV for the
naive path, 8NDV for ``xla``/``pallas_tpu`` (the backward recomputes the logits tiles once) and
10NDV for ``pallas_gpu`` (each of its two backward kernels recomputes them); on GPU/TPU the
TFLOP/s column is printed for both the 6NDV (useful work) and 8NDV conventions.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.kernels import FALLBACK_ORDER, token_kl, token_logprobs


def naive_logprobs(h, w, t):
    logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), t[:, None], axis=-1)[:, 0]


def chunked_logprobs(h, w, t, chunk=128):
    """Tunix-style: rematerialised scan over token chunks, full ``[chunk, V]`` logits in each."""
    n, d = h.shape

    @jax.checkpoint
    def body(_, xs):
        hc, tc = xs
        return None, naive_logprobs(hc, w, tc)

    _, lp = jax.lax.scan(body, None, (h.reshape(n // chunk, chunk, d), t.reshape(-1, chunk)))
    return lp.reshape(n)


def naive_kl(hp, wp, hq, wq):
    logp = jax.nn.log_softmax(jnp.dot(hp, wp, preferred_element_type=jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(jnp.dot(hq, wq, preferred_element_type=jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - jax.lax.stop_gradient(logq)), axis=-1)


def fwd_bwd(f):
    def loss(h, w, *rest):
        *rest, g = rest
        return jnp.sum(f(h, w, *rest) * g)

    return jax.value_and_grad(loss, argnums=(0, 1))


def temp_mb(fn, args) -> float:
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return stats.temp_size_in_bytes / 2**20


def time_interleaved(fns: dict, args_of: dict, reps: int) -> dict:
    jitted = {k: jax.jit(f) for k, f in fns.items()}
    for k, f in jitted.items():  # compile + warm up
        jax.block_until_ready(f(*args_of[k]))
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in jitted.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args_of[k]))
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def report(title, fns, args_of, reps, flops=None):
    """Print memory, time and ratios; ``flops``: {column label: FLOP count} for TFLOP/s."""
    mem = {k: temp_mb(f, args_of[k]) for k, f in fns.items()}
    sec = time_interleaved(fns, args_of, reps)
    print(f"\n{title}")
    print(
        f"  {'variant':<22}{'temp MiB':>10}{'mem/naive':>11}{'ms':>10}{'time/naive':>12}"
        + "".join(f"{'TF/s ' + label:>14}" for label in flops or {})
    )
    for k in fns:
        line = (
            f"  {k:<22}{mem[k]:>10.1f}{mem[k] / max(mem['naive'], 1e-9):>11.3f}"
            f"{sec[k] * 1e3:>10.1f}{sec[k] / sec['naive']:>12.3f}"
        )
        for count in (flops or {}).values():
            line += f"{count / sec[k] / 1e12:>14.1f}"
        print(line)
    return mem, sec


def bench_shape(n, d, v, dtype, reps, impls, block_size, chunk, kl=True):
    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(k[1], (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
    t = jax.random.randint(k[2], (n,), 0, v)
    g = jax.random.uniform(k[3], (n,), jnp.float32)
    variants = {
        "naive": naive_logprobs,
        f"chunked(c={chunk})": lambda h, w, t: chunked_logprobs(h, w, t, chunk),
    }
    for name in impls:
        variants[f"jaxalign.{name}"] = functools.partial(
            token_logprobs, implementation=name, block_size=block_size
        )
    variants[f"jaxalign.{impls[0]}+softcap"] = functools.partial(
        token_logprobs, implementation=impls[0], block_size=block_size, softcap=30.0
    )
    shape = f"N={n} D={d} V={v} {jnp.dtype(dtype).name}, block_size={block_size}"
    fwd_flops = 2 * n * d * v
    on_accelerator = jax.default_backend() != "cpu"
    report(
        f"token_logprobs forward  [{shape}]",
        variants,
        dict.fromkeys(variants, (h, w, t)),
        reps,
        flops={"2NDV": fwd_flops} if on_accelerator else None,
    )
    report(
        f"token_logprobs fwd+bwd  [{shape}]",
        {k: fwd_bwd(f) for k, f in variants.items()},
        dict.fromkeys(variants, (h, w, t, g)),
        reps,
        flops={"6NDV": 3 * fwd_flops, "8NDV": 4 * fwd_flops} if on_accelerator else None,
    )

    if not kl:
        return
    hq = jax.random.normal(k[2], (n, d), jnp.float32).astype(dtype)
    kl_variants = {
        "naive": naive_kl,
        "jaxalign.xla": lambda hp, wp, hq, wq: token_kl(
            hp, wp, hq, wq, implementation="xla", block_size=block_size
        ),
    }
    report(
        f"token_kl fwd+bwd (grads to p)  [{shape}]",
        {k: fwd_bwd(f) for k, f in kl_variants.items()},
        dict.fromkeys(kl_variants, (h, w, hq, w * 0.9, g)),
        reps,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="N=8192 D=4096 V=131072 bf16 on the GPU")
    ap.add_argument("--quick", action="store_true", help="only the first CPU shape")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=None, help="vocab tile (impl default)")
    ap.add_argument("--chunk", type=int, default=128, help="token chunk of the scan baseline")
    args = ap.parse_args()
    backend = jax.default_backend()
    impls = [i for i in FALLBACK_ORDER.get(backend, ("xla",)) if i != "reference"]
    print(f"backend={backend} devices={jax.devices()} jax={jax.__version__} impls={impls}")
    if args.gpu:
        bench_shape(
            8192, 4096, 131072, jnp.bfloat16, args.reps or 10, impls, args.block_size, args.chunk
        )
        return
    bench_shape(1024, 256, 32768, jnp.float32, args.reps or 15, impls, args.block_size, args.chunk)
    if not args.quick:
        bench_shape(
            2048,
            512,
            65536,
            jnp.float32,
            args.reps or 3,
            impls,
            args.block_size,
            args.chunk,
            kl=False,
        )


if __name__ == "__main__":
    main()
