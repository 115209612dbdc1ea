"""The GPU device suite: one run that measures what a GPU machine is lent for.

    bash benchmarks/device_suite.sh          # on a GPU machine: about 8 minutes at most
    bash benchmarks/device_suite.sh --dry    # the same code paths on CPU at tiny sizes (seconds)
    bash benchmarks/device_suite.sh --parts ceilings,logprob --json out.json

Parts, each in its own process with its own time cap (a crash, a hang or an out-of-memory in one
prints one line and the suite goes on; the exit status is non-zero if any part failed):

- ``ceilings``: bf16 matmul TFLOP/s (8192^3, random data) and device copy GB/s (``x + 1`` over
  2 GiB of float32, bytes read + written): the two rates everything below is measured against.
- ``kernels``: the Pallas GPU kernels (``jaxalign/kernels/logprob/pallas_gpu.py``,
  ``kernels/kl/pallas_gpu.py``) and the portable ``xla`` ones compiled for real, checked
  against ``implementation="reference"`` on the same inputs upcast to float32 (matmul precision
  "highest"): relative error ||out - ref|| / ||ref|| of the values and the gradients, float32
  and bfloat16, ragged N and V. Pass: <= 2e-3 for float32 inputs (Triton's float32 dot is
  tf32), <= 1e-2 for bfloat16 inputs.
- ``attention``: the model's cuDNN fused attention (``jaxalign.models.attention.attend``,
  ``implementation="cudnn"``) with GQA, causal and packed-segment masks, values and gradients
  against the XLA path in float32; pass <= 1e-2 (bf16 inputs).
- ``logprob``: ``token_logprobs`` forward + backward at N=8192, D=4096, V=131072 bf16 for each
  implementation the dispatch offers (goal <= 50 ms); TFLOP/s at 6NDV (the useful matmuls) and
  the fraction of the measured matmul rate.
- ``dpo``: the real jaxalign train step (``Run.jit_train_step()``: policy forward + backward,
  reference forward, AdamW) of DPO on ``llama3.2-1b`` (float32 master weights, bfloat16
  compute, remat "dots"), 16 pairs x 1024 tokens per step; MFU = 8 N tokens / time / peak (6N
  policy + 2N reference, N the matmul parameters; goal >= 45%) against the measured matmul rate
  and the datasheet's 989 TFLOP/s (H100/H200 SXM dense bf16).
- ``sampling``: ``jaxalign.sampling.generate`` with the same model in bf16 at batch 64 and 256,
  128-token prompts, 128 new tokens: decode tokens/s from the difference of a 128-token and a
  1-token run, against the HBM bound (every decode step reads all weights and the whole KV
  cache: tokens/s <= B x copy bandwidth / (weight bytes + cache bytes)).

Times are on the device (``block_until_ready``), warm-up excluded, median of repeats; compile time
is reported on its own. The table is printed last; ``--json`` (default ``$OUT/device_suite.json``
when ``OUT`` is set) gets every number. ``--dry`` runs every part on CPU with tiny shapes (the
Pallas GPU kernels in interpret mode, the XLA attention in place of cuDNN), so a GPU lease is
spent measuring, not debugging; ``tests/test_device_suite.py`` runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense, SXM


@dataclasses.dataclass(frozen=True)
class Sizes:
    matmul: int
    copy_floats: int
    check: tuple[int, int, int]  # N, D, V of the kernel checks (ragged on purpose)
    attention: tuple[int, int, int, int, int]  # B, T, N, K, H
    logprob: tuple[int, int, int]
    model: str
    pairs: int
    seq_len: int
    sample_batches: tuple[int, ...]
    prompt: int
    new: int
    reps: int


GPU = Sizes(
    matmul=8192,
    copy_floats=2**29,
    check=(1000, 512, 32000),
    attention=(2, 1024, 16, 4, 128),
    logprob=(8192, 4096, 131072),
    model="llama3.2-1b",
    pairs=16,
    seq_len=1024,
    sample_batches=(64, 256),
    prompt=128,
    new=128,
    reps=10,
)
DRY = Sizes(
    matmul=128,
    copy_floats=2**16,
    check=(40, 24, 300),
    attention=(2, 16, 4, 2, 8),
    logprob=(64, 32, 512),
    model="tiny-64",
    pairs=2,
    seq_len=32,
    sample_batches=(2,),
    prompt=8,
    new=3,
    reps=2,
)

# Seconds per part; together under the 8-minute budget with room for process start-up.
CAPS = {
    "ceilings": 40,
    "kernels": 75,
    "attention": 40,
    "logprob": 80,
    "dpo": 130,
    "sampling": 100,
}


# ---------------------------------------------------------------------------------------------
# Helpers shared by the parts (run in the child process).


class Recorder:
    """Collects a part's table rows and numbers, writing them to ``path`` after every change so
    a part killed at its time cap still leaves what it measured."""

    def __init__(self, part: str, path: str):
        self.part, self.path = part, path
        self.rows: list[list[str]] = []
        self.data: dict = {}
        self.errors: list[str] = []

    def row(self, what: str, value: str, goal: str = "", status: str = "") -> None:
        self.rows.append([self.part, what, value, goal, status])
        print(f"[{self.part}] {what}: {value} {goal} {status}".rstrip(), flush=True)
        self.save()

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def attempt(self, what: str, fn: Callable[[], None]) -> None:
        """Run one measurement; an exception becomes a one-line error row, the part goes on."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any failure of one check is reported, not fatal
            line = f"{what}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
            self.errors.append(line)
            self.row(what, "ERROR", "", f"{type(e).__name__}")
            print(f"[{self.part}] error: {line}", flush=True)

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"rows": self.rows, "data": self.data, "errors": self.errors}, f)
        os.replace(tmp, self.path)


def timed(fn, args: tuple, reps: int, *, carry: Callable | None = None) -> dict:
    """Compile ``fn`` (jitted here unless it is already) for ``args``, timed on its own; run
    once to warm up, then ``reps`` times with ``block_until_ready``: {"compile_s", "median_s",
    "times_s", "temp_bytes", "out"}. ``carry(args, out) -> args`` threads donated state from
    call to call."""
    import jax

    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)  # keep a jitted fn's shardings/donation
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        if carry is not None:
            args = carry(args, out)
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {
        "compile_s": compile_s,
        "median_s": statistics.median(times),
        "times_s": times,
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "out": out,
    }


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("nan")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def highest_precision():
    """float32 matmuls at full precision for the references (GPUs default to tf32)."""
    import jax

    return jax.default_matmul_precision("highest")


def verdict(err: float, limit: float) -> str:
    return "ok" if err <= limit else "FAIL"  # NaN fails


def peak_tflops(ceilings: dict) -> float:
    """The measured bf16 matmul rate, else the datasheet's (said so in the JSON)."""
    return ceilings.get("matmul_tflops") or ceilings.get("datasheet_tflops") or float("nan")


# ---------------------------------------------------------------------------------------------
# Parts.


def part_ceilings(rec: Recorder, sizes: Sizes, dry: bool, ceilings: dict) -> None:
    import jax
    import jax.numpy as jnp

    def matmul():
        n = sizes.matmul
        ka, kb = jax.random.split(jax.random.key(0))
        a = jax.random.normal(ka, (n, n), jnp.float32).astype(jnp.bfloat16)
        b = jax.random.normal(kb, (n, n), jnp.float32).astype(jnp.bfloat16)
        r = timed(jnp.matmul, (a, b), sizes.reps * 2)
        tflops = 2 * n**3 / r["median_s"] / 1e12
        rec.put("matmul_tflops", tflops)
        rec.put("matmul_s", r["median_s"])
        rec.row(f"bf16 matmul {n}^3", f"{tflops:.4g} TFLOP/s ({r['median_s'] * 1e3:.2f} ms)")

    def copy():
        x = jax.random.normal(jax.random.key(1), (sizes.copy_floats,), jnp.float32)
        r = timed(lambda x: x + 1, (x,), sizes.reps * 2)
        gbs = 2 * x.nbytes / r["median_s"] / 1e9
        rec.put("copy_gbs", gbs)
        rec.row(f"copy {x.nbytes / 2**30:.3g} GiB f32 (x+1)", f"{gbs:.0f} GB/s (read+write)")

    rec.attempt("bf16 matmul", matmul)
    rec.attempt("copy", copy)


def _inputs(n, d, v, dtype, seed):
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(k[0], (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(k[1], (d, v), jnp.float32) * d**-0.5 * 4).astype(dtype)
    t = jax.random.randint(k[2], (n,), 0, v)
    g = jax.random.normal(k[3], (n,), jnp.float32)
    h2 = jax.random.normal(k[4], (n, d), jnp.float32).astype(dtype)
    return h, w, t, g, h2


def part_kernels(rec: Recorder, sizes: Sizes, dry: bool, ceilings: dict) -> None:
    import jax
    import jax.numpy as jnp

    from jaxalign.kernels import token_kl, token_logprobs

    n, d, v = sizes.check
    limits = {"float32": 2e-3, "bfloat16": 1e-2}

    def logprob_outputs(impl, h, w, t, g):
        def loss(h, w):
            lp, extra = token_logprobs(
                h, w, t, implementation=impl, return_entropy=True, return_sum_sq=True,
                interpret=dry and impl == "pallas_gpu",
            )  # fmt: skip
            total = jnp.sum(g * lp) + jnp.sum(g * extra["entropy"])
            return total, (lp, extra["entropy"], extra["sum_sq_probs"])

        (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w)
        return dict(zip(("logp", "entropy", "sum_sq"), outs, strict=True)) | {
            "d_hidden": grads[0],
            "d_unembedding": grads[1],
        }

    def kl_outputs(impl, h, w, h2):
        def loss(h, w):
            kl = token_kl(h, w, h2, w, implementation=impl, interpret=dry and impl == "pallas_gpu")
            return jnp.sum(kl * jnp.linspace(0.5, 1.5, kl.shape[0])), kl

        (_, kl), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w)
        return {"kl": kl, "d_hidden": grads[0], "d_unembedding": grads[1]}

    for op, outputs in (("logprob", logprob_outputs), ("kl", kl_outputs)):
        for dtype in ("float32", "bfloat16"):
            h, w, t, g, h2 = _inputs(n, d, v, jnp.dtype(dtype), seed=len(op) + len(dtype))
            args = (h, w, t, g) if op == "logprob" else (h, w, h2)
            up = tuple(a.astype(jnp.float32) if a.dtype == jnp.dtype(dtype) else a for a in args)
            with highest_precision():
                ref = outputs("reference", *up)
            for impl in ("pallas_gpu", "xla"):

                def check(op=op, dtype=dtype, impl=impl, args=args, ref=ref, outputs=outputs):
                    out = outputs(impl, *args)
                    errs = {k: rel_err(out[k], ref[k]) for k in ref}
                    worst = max(errs.values(), key=lambda e: (np.isnan(e), e))
                    rec.put(f"{op}/{impl}/{dtype}", errs)
                    shown = ", ".join(f"{k} {e:.1e}" for k, e in errs.items())
                    rec.row(
                        f"{op} {impl} {dtype} N={n} D={d} V={v}",
                        shown,
                        f"<= {limits[dtype]:.0e}",
                        verdict(worst, limits[dtype]),
                    )

                rec.attempt(f"{op} {impl} {dtype}", check)


def attention_check(impl: str, q, k, v, mask):
    """Attention output and gradients of ``sum(out * cotangent)`` w.r.t. q, k, v."""
    import jax
    import jax.numpy as jnp

    from jaxalign.models.attention import attend

    def loss(q, k, v):
        out = attend(q, k, v, mask, scale=None, implementation=impl)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return {"out": out, "dq": grads[0], "dk": grads[1], "dv": grads[2]}


def part_attention(rec: Recorder, sizes: Sizes, dry: bool, ceilings: dict) -> None:
    import jax
    import jax.numpy as jnp

    B, T, N, K, H = sizes.attention
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, K, H), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, K, H), jnp.float32).astype(jnp.bfloat16)
    # Row 0 one sequence, row 1 two packed sequences and padding (segment 0) at the end.
    cut, pad = T // 3, T - T // 8
    seg = np.ones((B, T), np.int32)
    seg[1, cut:] = 2
    seg[1, pad:] = 0
    causal = np.tril(np.ones((T, T), bool))
    mask = jnp.asarray((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
    impl = "xla" if dry else "cudnn"
    with highest_precision():
        ref = attention_check("xla", q.astype(jnp.float32), k.astype(jnp.float32),
                              v.astype(jnp.float32), mask)  # fmt: skip

    def check():
        out = attention_check(impl, q, k, v, mask)
        errs = {name: rel_err(out[name], ref[name]) for name in ref}
        worst = max(errs.values(), key=lambda e: (np.isnan(e), e))
        rec.put(f"{impl}/bfloat16", errs)
        rec.row(
            f"attention {impl} bf16 B={B} T={T} N={N} K={K} H={H} causal+segments",
            ", ".join(f"{name} {e:.1e}" for name, e in errs.items()),
            "<= 1e-02",
            verdict(worst, 1e-2),
        )

    rec.attempt(f"attention {impl}", check)


def part_logprob(rec: Recorder, sizes: Sizes, dry: bool, ceilings: dict) -> None:
    import jax
    import jax.numpy as jnp

    from jaxalign.kernels import FALLBACK_ORDER, token_logprobs

    n, d, v = sizes.logprob
    h, w, t, g, _ = _inputs(n, d, v, jnp.bfloat16, seed=7)
    peak = peak_tflops(ceilings)
    impls = FALLBACK_ORDER.get(jax.default_backend(), ("xla", "reference"))
    if dry:
        impls = ("pallas_gpu", *impls)  # interpret mode: the GPU code path, on CPU
    useful = 6 * n * d * v
    for impl in impls:

        def run(impl=impl):
            def loss(h, w):
                lp = token_logprobs(h, w, t, implementation=impl, interpret=dry)
                return jnp.sum(g * lp)

            r = timed(jax.value_and_grad(loss, argnums=(0, 1)), (h, w), sizes.reps)
            ms = r["median_s"] * 1e3
            tflops = useful / r["median_s"] / 1e12
            rec.put(impl, {k: r[k] for k in ("compile_s", "median_s", "times_s", "temp_bytes")})
            rec.row(
                f"logprob fwd+bwd {impl} N={n} D={d} V={v} bf16",
                f"{ms:.1f} ms, {tflops:.3g} TFLOP/s (6NDV) = {tflops / peak:.0%} of peak, "
                f"temp {(r['temp_bytes'] or 0) / 2**20:.0f} MiB, compile {r['compile_s']:.1f} s",
                "<= 50 ms",
                "" if dry else ("ok" if ms <= 50 else "MISS"),
            )

        rec.attempt(f"logprob {impl}", run)


def _pair_batch(run, pairs: int, T: int, vocab: int) -> dict:
    """One micro-batch of ``pairs`` pairs in pad mode: row i is sequence i (chosen of pair i,
    rejected of pair i - pairs), every position real, the response the last 3/4 of each row."""
    rng = np.random.default_rng(0)
    R = 2 * pairs
    batch = {
        "tokens": rng.integers(0, vocab, (R, T), dtype=np.int32),
        "targets": rng.integers(0, vocab, (R, T), dtype=np.int32),
        "loss_mask": np.broadcast_to(np.arange(T) >= T // 4, (R, T)).astype(np.float32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (R, T)).copy(),
        "segment_ids": np.ones((R, T), np.int32),
        "seq_index": np.broadcast_to(np.arange(R, dtype=np.int32)[:, None], (R, T)).copy(),
        "example_mask": np.ones(pairs, np.float32),
    }
    return run.global_batch([batch])


def part_dpo(rec: Recorder, sizes: Sizes, dry: bool, ceilings: dict) -> None:
    """The step with the platform's attention ("auto"); if that fails off CPU (a cuDNN error,
    say), the error is recorded and the step is measured again with XLA attention."""
    from jaxalign.models.attention import resolve

    for attention in ("auto", "xla"):
        before = len(rec.errors)
        rec.attempt(
            f"DPO step ({resolve(attention)} attention)",
            lambda attention=attention: _dpo_step(rec, sizes, ceilings, attention),
        )
        if len(rec.errors) == before or resolve("auto") == "xla":
            return


def _dpo_step(rec: Recorder, sizes: Sizes, ceilings: dict, attention: str) -> None:
    import jax
    import jax.numpy as jnp

    from jaxalign import models
    from jaxalign.config import base_config
    from jaxalign.models.attention import resolve
    from jaxalign.train import plan
    from jaxalign.train.run import init_params, setup

    c = base_config()
    c.trainer = "paired"
    c.model.preset = sizes.model
    c.model.dtype = "bfloat16"
    c.model.remat = "dots"
    c.model.attention = attention
    c.data.batch_size = sizes.pairs
    c.data.max_len = sizes.seq_len
    c.mesh.fsdp = 1
    run = setup(c, devices=jax.devices()[:1], read_files=False)
    mc = run.model_config
    params = init_params(run)
    ref_params = jax.tree.map(jnp.copy, params)
    opt_init = jax.jit(run.tx.init, out_shardings=run.state_shardings["opt_state"])
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), run.replicated),
        "params": params,
        "opt_state": opt_init(params),
    }
    batch = _pair_batch(run, sizes.pairs, sizes.seq_len, mc.vocab_size)
    tokens = 2 * sizes.pairs * sizes.seq_len
    matmul_params = models.param_count(mc) - (
        0 if mc.tie_embeddings else mc.vocab_size * mc.d_model
    )
    model_flops = 8 * matmul_params * tokens
    by_hand = plan.analytic_flops(mc, tokens, sizes.seq_len, needs_ref=True)
    r = timed(
        run.jit_train_step(),
        (state, ref_params, batch),
        max(2, sizes.reps // 2),
        carry=lambda args, out: (out[0], *args[1:]),
    )
    loss = float(r["out"][1]["loss"])
    step_s = r["median_s"]
    peak = peak_tflops(ceilings)
    mfu = model_flops / step_s / 1e12 / peak
    datasheet = ceilings.get("datasheet_tflops")
    rec.put(
        f"step_{resolve(mc.attention)}",
        {k: r[k] for k in ("compile_s", "median_s", "times_s", "temp_bytes")}
        | {
            "model": sizes.model,
            "params": models.param_count(mc),
            "matmul_params": matmul_params,
            "tokens": tokens,
            "model_flops": model_flops,
            "flops_by_hand": by_hand,
            "mfu_measured_peak": mfu,
            "mfu_datasheet": model_flops / step_s / 1e12 / datasheet if datasheet else None,
            "tokens_per_s": tokens / step_s,
            "loss": loss,
            "attention": resolve(mc.attention),
        },
    )
    rec.row(
        f"DPO step {sizes.model} {sizes.pairs} pairs x {sizes.seq_len} (policy+ref, AdamW, "
        f"{resolve(mc.attention)} attention)",
        f"{step_s * 1e3:.0f} ms, {tokens / step_s:,.0f} tok/s, MFU {mfu:.1%} of measured peak"
        + (f" ({model_flops / step_s / 1e12 / datasheet:.1%} of datasheet)" if datasheet else "")
        + f", by-hand FLOPs {by_hand / step_s / 1e12 / peak:.0%}, compile {r['compile_s']:.0f} s",
        ">= 45%",
        "" if jax.default_backend() == "cpu" else ("ok" if mfu >= 0.45 else "MISS"),
    )
    if not np.isfinite(loss):
        raise FloatingPointError(f"DPO loss is {loss}")


def part_sampling(rec: Recorder, sizes: Sizes, dry: bool, ceilings: dict) -> None:
    import jax

    from jaxalign import models
    from jaxalign.sampling import SamplingOptions, generate, prompts_from_ids

    mc = models.get_preset(sizes.model, dtype="bfloat16", param_dtype="bfloat16")
    params = jax.jit(models.init_params, static_argnums=0)(mc, jax.random.key(0))
    weight_bytes = models.param_count(mc) * 2
    bandwidth = ceilings.get("copy_gbs") or float("nan")
    P, M = sizes.prompt, sizes.new
    for B in sizes.sample_batches:

        def run(B=B):
            ids = np.random.default_rng(B).integers(0, mc.vocab_size, (B, P)).tolist()
            prompts = prompts_from_ids(ids, pad_id=0, buckets=[P])
            medians = {}
            for new in (M, 1):
                options = SamplingOptions(max_new_tokens=new, temperature=1.0)
                times = []
                for rep in range(1 + max(2, sizes.reps // 3)):
                    t0 = time.perf_counter()
                    result = generate(mc, params, prompts, rng=jax.random.key(rep), options=options)
                    times.append(time.perf_counter() - t0)
                assert result.tokens.shape == (B, new), result.tokens.shape
                medians[new] = statistics.median(times[1:])
                rec.put(f"batch{B}/new{new}", {"first_s": times[0], "times_s": times[1:]})
            decode_s = (medians[M] - medians[1]) / (M - 1)
            cache_bytes = 2 * mc.n_layers * B * (P + M) * mc.n_kv_heads * mc.head_dim * 2
            bound = B * bandwidth * 1e9 / (weight_bytes + cache_bytes)
            rate = B / decode_s if decode_s > 0 else float("nan")  # tiny dry runs: noise
            rec.put(
                f"batch{B}",
                {
                    "decode_tokens_per_s": rate,
                    "end_to_end_tokens_per_s": B * M / medians[M],
                    "hbm_bound_tokens_per_s": bound,
                    "weight_bytes": weight_bytes,
                    "cache_bytes": cache_bytes,
                },
            )
            rec.row(
                f"sampling {sizes.model} bf16 batch {B}, prompt {P}, {M} new",
                f"decode {rate:,.0f} tok/s = {rate / bound:.0%} of HBM bound {bound:,.0f}; "
                f"end to end {B * M / medians[M]:,.0f} tok/s",
            )

        rec.attempt(f"sampling batch {B}", run)


PARTS = {
    "ceilings": part_ceilings,
    "kernels": part_kernels,
    "attention": part_attention,
    "logprob": part_logprob,
    "dpo": part_dpo,
    "sampling": part_sampling,
}


def child(part: str, result: str, dry: bool, ceilings: dict) -> int:
    """Run one part in this process, its numbers and rows going to ``result``."""
    import jax

    rec = Recorder(part, result)
    kind = jax.devices()[0].device_kind
    rec.put("device", kind)
    sheet = next((tf for name, tf in DATASHEET_BF16_TFLOPS.items() if name in kind), None)
    ceilings = {"datasheet_tflops": sheet} | ceilings
    try:
        PARTS[part](rec, DRY if dry else GPU, dry, ceilings)
    except Exception as e:  # noqa: BLE001 - reported as the part's one-line error
        first = str(e).strip().splitlines()[0] if str(e) else ""
        rec.errors.append(f"{type(e).__name__}: {first}")
        rec.save()
        print(f"[{part}] error: {type(e).__name__}: {first}", flush=True)
    return 1 if rec.errors else 0


# ---------------------------------------------------------------------------------------------
# Driver (the parent process): one child per part, each with a time cap.


def run_parts(commands: dict[str, list[str]], caps: dict[str, float], budget: float) -> dict:
    """Run each ``commands[name] + ["--result", FILE]`` with its cap (cut to what is left of
    ``budget`` seconds) and collect {name: {"status", "seconds", "error", "rows", "data"}}.
    Status: ok, failed (non-zero exit or errors), timeout (killed at the cap; what it saved is
    kept), skipped (no budget left)."""
    start = time.monotonic()
    results = {}
    with tempfile.TemporaryDirectory(prefix="device-suite-") as tmp:
        for name, command in commands.items():
            left = budget - (time.monotonic() - start)
            if left < 5:
                results[name] = {"status": "skipped", "error": "no time left in the budget"}
                print(f"[{name}] skipped: no time left in the {budget:.0f} s budget", flush=True)
                continue
            cap = min(caps[name], left)
            path = os.path.join(tmp, f"{name}.json")
            t0 = time.monotonic()
            try:
                rc = subprocess.run([*command, "--result", path], timeout=cap).returncode
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                rc, status = None, "timeout"
            saved = {"rows": [], "data": {}, "errors": []}
            if os.path.exists(path):
                with open(path) as f:
                    saved = json.load(f)
            error = "; ".join(saved["errors"])
            if status == "timeout":
                error = f"killed at its {cap:.0f} s cap" + (f"; {error}" if error else "")
            elif status == "failed" and not error:
                error = f"exit status {rc}"
            elif status == "ok" and error:
                status = "failed"
            if error:
                print(f"[{name}] {status}: {error}", flush=True)
            results[name] = {
                "status": status,
                "seconds": time.monotonic() - t0,
                "error": error,
                "rows": saved["rows"],
                "data": saved["data"],
            }
    return results


def table(results: dict) -> str:
    rows = [["part", "measurement", "value", "goal", "status"]]
    for name, r in results.items():
        rows += r.get("rows", [])
        if r["status"] != "ok":
            rows.append([name, f"part {r['status']}", (r.get("error") or "")[:150], "", "FAIL"])
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes: test every code path")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of parts")
    ap.add_argument("--budget", type=float, default=470, help="seconds for all parts together")
    ap.add_argument("--json", default=None, help="default: $OUT/device_suite.json if OUT is set")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--ceilings", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        return child(args.part, args.result, args.dry, json.loads(args.ceilings))

    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; known: {list(PARTS)}")
    base = [sys.executable, os.path.abspath(__file__), *(["--dry"] if args.dry else [])]
    started = time.monotonic()
    results = {}
    if "ceilings" in parts:  # first: the later parts are measured against its numbers
        results |= run_parts({"ceilings": [*base, "--part", "ceilings"]}, CAPS, args.budget)
    measured = results.get("ceilings", {}).get("data", {})
    ceilings = {k: measured[k] for k in ("matmul_tflops", "copy_gbs") if k in measured}
    rest = {p: [*base, "--part", p, "--ceilings", json.dumps(ceilings)] for p in parts}
    rest.pop("ceilings", None)
    results |= run_parts(rest, CAPS, args.budget - (time.monotonic() - started))

    import jax

    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dry": args.dry,
        "jax": jax.__version__,
        "python": sys.version.split()[0],
        "ceilings": ceilings,
        "seconds": time.monotonic() - started,
        "parts": results,
    }
    path = args.json or (
        os.path.join(os.environ["OUT"], "device_suite.json") if "OUT" in os.environ else None
    )
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(tmp, path)
    failed = [name for name, r in results.items() if r["status"] != "ok"]
    print(f"\ndevice suite ({'dry, CPU' if args.dry else 'device'}), jax {jax.__version__}, "
          f"{report['seconds']:.0f} s" + (f", JSON: {path}" if path else ""))  # fmt: skip
    print(table(results))
    if failed:
        print(f"failed parts: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
