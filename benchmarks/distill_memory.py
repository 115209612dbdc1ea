"""Memory of the GKD loss + gradient: the blocked JSD kernel vs the naive two-logits path.

    python benchmarks/distill_memory.py            # N=2048 tokens, V=32000, D=256 (student and
                                                   #   teacher), float32, vocab tile 1024
    python benchmarks/distill_memory.py --quick    # N=256, V=4000, D=64 (a test runs it)

Both sides compile `jax.value_and_grad` of sum_i JSD_b(p_T, p_S)_i (b = 0.5) with respect to the
student's hidden states and unembedding, from abstract inputs (nothing runs): the kernel is
`jaxalign.kernels.token_jsd(implementation="xla")` (two passes over vocab tiles, backward by
recomputation), the naive path `implementation="reference"` (the student's and the teacher's full
[N, V] logits and log-softmaxes, autodiff). Printed: XLA's
`compile().memory_analysis().temp_size_in_bytes` of each, their ratio, and for scale the bytes of
one float32 [N, V] array.
"""

import argparse
import functools

import jax
import jax.numpy as jnp

from jaxalign.kernels import token_jsd


def temp_bytes(impl: str, n: int, vocab: int, d: int, block: int) -> int:
    def loss(hs, ws, ht, wt):
        out = token_jsd(hs, ws, ht, wt, beta=0.5, implementation=impl, block_size=block)
        return jnp.sum(out)

    spec = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    args = (spec((n, d)), spec((d, vocab)), spec((n, d)), spec((d, vocab)))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    n, vocab, d = (256, 4000, 64) if args.quick else (2048, 32000, 256)
    block = 1024
    kernel = temp_bytes("xla", n, vocab, d, block)
    naive = temp_bytes("reference", n, vocab, d, block)
    mib = 1 << 20
    print(f"GKD loss + grad, N={n} V={vocab} D={d} float32, {jax.default_backend()}")
    print(f"  one [N, V] float32 array      {4 * n * vocab / mib:9.1f} MiB")
    print(f"  naive (two full logits)       {naive / mib:9.1f} MiB temporaries")
    print(f"  token_jsd xla (tile {block})   {kernel / mib:9.1f} MiB temporaries")
    print(f"  ratio naive / kernel          {naive / max(kernel, 1):9.1f}x")
    return {"kernel": kernel, "naive": naive, "nv_bytes": 4 * n * vocab}


if __name__ == "__main__":
    main()
