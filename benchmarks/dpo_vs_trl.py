"""DPO step speed: `jaxalign train` vs TRL's `DPOTrainer`, side by side on this CPU.

    python benchmarks/dpo_vs_trl.py            # Llama d=256 L=4 heads 8/4 ffn 1024 V=32000 f32;
                                               #   8 pairs x (64 prompt + 191 response) tokens
    python benchmarks/dpo_vs_trl.py --quick    # a small configuration (a test runs it)
    python benchmarks/dpo_vs_trl.py --steps 8  # more timed steps per side

One random-init Llama (untied unembedding) is written once as a Hugging Face directory with a
word-level tokenizer over its whole vocabulary (ids 0-2 `<pad> <s> </s>`, then words `w3`...), and
both sides load it: jaxalign through `jaxalign train`'s loop (`jaxalign.train.train`, the paired
family, `model.init_from=hf:DIR`, loss `dpo`, beta 0.1, the reference forward every step), TRL
through `DPOTrainer` (its default reference: a frozen copy of the model, forward every step).
Same pairs: prompt = BOS + `prompt - 1` random words, chosen and rejected = `response - 1` random
words + EOS, so every sequence is exactly `prompt + response` tokens on both sides (TRL:
`max_length` = that, nothing truncated; all sequences equal, so no padding; jaxalign:
`max_prompt_len` = prompt and `max_len` = prompt + response - 1, since a sequence of n + 1 tokens
fills its n model positions, inputs ids[:-1] and targets ids[1:], where TRL runs the model on all
n + 1 and drops the last logit). The script checks the token counts of both sides.

Timing: each side runs `1 + --steps` optimizer steps of one batch; the first (jaxalign: compile)
is dropped and the median of the others gives tokens/s = pairs x 2 x (prompt + response) / step
time. jaxalign's step time is the loop's own wall time between logged steps (`log_every=1`, so it
includes the batch fetch and one host sync), TRL's the trainer's `on_step_begin` / `on_step_end`.
The sides run back to back in this process, jaxalign first, `--repeats` times (fresh runs), and
the medians over repeats are printed; the load average is printed since the machines are shared.

Utilisation: model FLOPs per token = 8 x P + 16 x L x T x D, where P counts the weights used in
matmuls (every layer's projections and the unembedding; the input embedding is a gather, not
counted): 2P forward, 4P backward for the policy, 2P for the reference forward; attention
4 x L x T x D per forward (scores and values over the full T x T, causality not discounted), four
forwards' worth. Divided by the step time and the measured f32 GEMM peak of this CPU (median of
`--peak-reps` 2048^3 matmuls in JAX: 2 x 2048^3 FLOPs each).

Without TRL (`pip install 'jaxalign[bench]'`) the TRL half is skipped with a message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np
from hf_llama import write_model_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
BETA = 0.1
LR = 1e-6


@dataclasses.dataclass(frozen=True)
class Shape:
    d: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    pairs: int  # per step
    prompt: int  # tokens, BOS included
    response: int  # tokens, EOS included
    steps: int  # timed steps per side, after the first
    peak_n: int  # the GEMM peak's matmul size


FULL = Shape(
    d=256,
    layers=4,
    heads=8,
    kv_heads=4,
    ffn=1024,
    vocab=32000,
    pairs=8,
    prompt=64,
    response=191,
    steps=5,
    peak_n=2048,
)
QUICK = Shape(
    d=64,
    layers=2,
    heads=4,
    kv_heads=2,
    ffn=128,
    vocab=1024,
    pairs=2,
    prompt=8,
    response=16,
    steps=2,
    peak_n=256,
)


def matmul_params(shape: Shape) -> int:
    """P: the weights used in matmuls (projections of every layer and the unembedding)."""
    head = shape.d // shape.heads
    attention = 2 * shape.d * shape.heads * head + 2 * shape.d * shape.kv_heads * head
    return shape.layers * (attention + 3 * shape.d * shape.ffn) + shape.d * shape.vocab


def flops_per_token(shape: Shape) -> float:
    """8 P + 16 L T D: policy forward + backward (6P) and reference forward (2P), plus attention
    (4 L T D per forward, four forwards' worth)."""
    t = shape.prompt + shape.response
    return 8.0 * matmul_params(shape) + 16.0 * shape.layers * t * shape.d


def gemm_peak(n: int, reps: int = 7) -> float:
    """Median f32 FLOP/s of an n^3 matmul in JAX on the default device."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.dot)
    jax.block_until_ready(mm(a, b))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)


def write_pairs(shape: Shape, path: pathlib.Path, count: int) -> list[dict]:
    """`count` pairs of random words: the prompt `prompt - 1` words (+ BOS), each response
    `response - 1` words and EOS (a leading space, so the words stay apart when TRL concatenates
    prompt and response text)."""
    rng = np.random.default_rng(0)

    def words(n):
        return " ".join(f"w{i}" for i in rng.integers(3, shape.vocab, n))

    pairs = [
        {
            "prompt": words(shape.prompt - 1),
            "chosen": " " + words(shape.response - 1) + " </s>",
            "rejected": " " + words(shape.response - 1) + " </s>",
        }
        for _ in range(count)
    ]
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return pairs


def jaxalign_config(shape: Shape, model_dir: pathlib.Path, pairs: pathlib.Path, impl="auto"):
    """The DPO run's config: configs/dpo/tiny.py on the HF directory and the pairs, with
    `logprob_impl` = `impl`."""
    from jaxalign.config import apply_overrides, load_config

    return apply_overrides(
        load_config(str(ROOT / "configs/dpo/tiny.py")),
        [
            f"model.init_from=hf:{model_dir}",
            "model.preset=",
            f"tokenizer={model_dir / 'tokenizer.json'}",
            f"data.train={pairs}",
            "data.eval=",
            f"data.batch_size={shape.pairs}",
            f"data.max_len={shape.prompt + shape.response - 1}",
            f"data.max_prompt_len={shape.prompt}",
            "loss.name=dpo",
            f"loss.beta={BETA}",
            f"optimizer.lr={LR}",
            "optimizer.warmup_steps=0",
            f"steps={1 + shape.steps}",
            "log_every=1",
            "eval_every=0",
            "checkpoint.every=1000000",
            "checkpoint.async_save=False",
            f"logprob_impl={impl}",
        ],
    )


def run_jaxalign(
    shape: Shape, model_dir: pathlib.Path, pairs: pathlib.Path, workdir, impl="auto"
) -> dict:
    """1 + steps DPO steps of `jaxalign.train.train`; step seconds from its logged tokens/s."""
    from jaxalign.train import train

    train(jaxalign_config(shape, model_dir, pairs, impl), workdir)
    records = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    records = [r for r in records if r["split"] == "train"]
    return {
        "step_s": [r["tokens"] / r["tokens_per_s"] for r in records],
        "tokens": [r["tokens"] for r in records],
    }


def run_trl(shape: Shape, model_dir: pathlib.Path, pairs: list[dict], outdir) -> dict:
    """1 + steps DPO steps of TRL's DPOTrainer; step times from a callback, token counts from the
    batches its loss sees."""
    import datasets
    import torch
    import transformers
    import trl

    args = trl.DPOConfig(
        output_dir=str(outdir),
        per_device_train_batch_size=shape.pairs,
        gradient_accumulation_steps=1,
        max_length=shape.prompt + shape.response,
        beta=BETA,
        loss_type=["sigmoid"],
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        max_steps=1 + shape.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    trainer = trl.DPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(pairs),
        processing_class=tokenizer,
    )
    times = {"step_s": [], "tokens": []}
    compute_loss = trainer.compute_loss

    def counted(model, inputs, *a, **kw):
        times["tokens"].append(int(inputs["attention_mask"].sum()))
        return compute_loss(model, inputs, *a, **kw)

    trainer.compute_loss = counted

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times["step_s"].append(time.perf_counter() - self.t0)

    trainer.add_callback(StepTimer())
    trainer.train()
    return times


def profile_parts(shape: Shape, model_dir: pathlib.Path, pairs: pathlib.Path, reps: int) -> None:
    """Where jaxalign's DPO step spends its time: each part jitted alone on the benchmark's batch,
    timed interleaved (every repetition runs every part once, in turn; median of ``reps``), with
    XLA's FLOP count of the whole step."""
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    from jaxalign import kernels, models
    from jaxalign.models.attention import attend
    from jaxalign.train.objectives import token_logps
    from jaxalign.train.run import init_params, setup

    run = setup(jaxalign_config(shape, model_dir, pairs))
    mc = run.model_config
    params = init_params(run)
    ref = jax.tree.map(jnp.copy, params)
    stream = iter(run.batches(str(pairs), train=True))

    def fetch():
        return run.global_batch([next(stream)])

    batch = fetch()
    micro = jax.tree.map(lambda x: x[0], batch)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": jax.jit(run.tx.init)(params),
    }
    rows, t = micro["tokens"].shape
    model_args = (micro["tokens"], micro["positions"], micro["segment_ids"])
    forward = functools.partial(models.forward, mc)
    hidden = jax.jit(forward)(params, *model_args)
    w = models.unembedding(mc, params)
    mask = micro["loss_mask"] > 0
    head = mc.d_model // mc.n_heads
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (rows, t, mc.n_heads, head))
    kv = [jax.random.normal(k, (rows, t, mc.n_kv_heads, head)) for k in keys[1:]]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = micro["segment_ids"][:, :, None] == micro["segment_ids"][:, None, :]
    attn_mask = (causal[None] & same)[:, None]

    def kernel(impl):
        def f(h, w):
            lp = kernels.token_logprobs(h, w, micro["targets"], mask=mask, implementation=impl)
            return jnp.sum(lp)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    def attention_loss(q, k, v):
        return jnp.sum(attend(q, k, v, attn_mask, scale=None, implementation="xla") * q)

    def policy_loss(p):
        return jnp.sum(token_logps(mc, p, micro))

    def hidden_loss(p):
        return jnp.sum(forward(p, *model_args) * hidden)

    grads = jax.jit(jax.grad(policy_loss))(params)
    step = run.jit_train_step()
    compiled = step.lower(state, ref, batch).compile()
    flops = compiled.cost_analysis().get("flops", float("nan"))
    update = jax.jit(lambda g, o, p: optax.apply_updates(p, run.tx.update(g, o, p)[0]))
    policy = jax.jit(jax.grad(policy_loss))
    reference = jax.jit(lambda p: token_logps(mc, p, micro))
    model_grad = jax.jit(jax.grad(hidden_loss))
    model_fwd = jax.jit(forward)
    attention = jax.jit(jax.grad(attention_loss, argnums=(0, 1, 2)))
    blocked, plain, default = kernel("xla"), kernel("reference"), kernel(None)
    parts = {
        "train step (whole)": lambda: compiled(jax.tree.map(jnp.copy, state), ref, batch),
        "policy fwd+bwd (model + log-probs)": lambda: policy(params),
        "reference forward (model + log-probs)": lambda: reference(ref),
        "model fwd+bwd (no unembedding)": lambda: model_grad(params),
        "model forward (no unembedding)": lambda: model_fwd(params, *model_args),
        f"attention fwd+bwd alone x {mc.n_layers} layers": lambda: [
            attention(q, *kv) for _ in range(mc.n_layers)
        ],
        "log-prob kernel fwd+bwd, xla (blocked)": lambda: blocked(hidden, w),
        "log-prob kernel fwd+bwd, reference (plain)": lambda: plain(hidden, w),
        "log-prob kernel fwd+bwd, CPU default (kept)": lambda: default(hidden, w),
        "optimizer (clip + AdamW + apply)": lambda: update(grads, state["opt_state"], params),
        "host: next batch + device_put": fetch,
    }
    for fn in parts.values():  # compile and warm up
        jax.block_until_ready(fn())
    times = {name: [] for name in parts}
    for _ in range(reps):
        for name, fn in parts.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    print(
        f"\nprofile of the jaxalign step: {rows} rows x {t} positions, D={mc.d_model}, "
        f"V={mc.vocab_size}; XLA's cost analysis counts {flops:.4g} FLOPs per step "
        f"(the formula: {flops_per_token(shape) * rows * (t + 1):.4g}); load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(f"  {'part':<48}{'ms':>9}{'of step':>9}")
    whole = statistics.median(times["train step (whole)"])
    for name, ts in times.items():
        sec = statistics.median(ts)
        print(f"  {name:<48}{sec * 1e3:>9.1f}{sec / whole:>9.1%}")


def steady(times: dict) -> dict:
    """First step apart; the median of the others."""
    return {
        "first_s": times["step_s"][0],
        "step_s": statistics.median(times["step_s"][1:]),
        "tokens": times["tokens"][-1],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small configuration (seconds)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per side (after one)")
    ap.add_argument("--repeats", type=int, default=3, help="back-to-back runs of both sides")
    ap.add_argument("--peak-reps", type=int, default=7, help="matmuls for the GEMM peak")
    ap.add_argument("--profile", action="store_true", help="only time the parts of jaxalign's step")
    ap.add_argument("--skip-trl", action="store_true", help="jaxalign's side only")
    ap.add_argument(
        "--also-impl",
        default="",
        help="also run jaxalign with this logprob_impl, a row of its own (e.g. xla: the backward "
        "recomputes the logits tiles, the default before it kept them on CPU)",
    )
    args = ap.parse_args()
    shape = QUICK if args.quick else FULL
    if args.steps is not None:
        shape = dataclasses.replace(shape, steps=max(1, args.steps))

    import jax

    try:
        import torch
        import trl
    except ImportError as e:
        trl = None
        why = f"{e.name} is not installed (pip install 'jaxalign[bench]')"
    if args.skip_trl:
        trl, why = None, "--skip-trl"
    directory = pathlib.Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    model_dir = directory / "model"
    write_model_dir(shape, model_dir, positions=shape.prompt + shape.response)
    pairs = write_pairs(shape, directory / "pairs.jsonl", count=shape.pairs * (1 + shape.steps))
    versions = f"jax {jax.__version__}"
    if trl is not None:
        versions += f", trl {trl.__version__}, torch {torch.__version__}"
        torch.set_num_threads(os.cpu_count())
    if args.profile:
        profile_parts(shape, model_dir, directory / "pairs.jsonl", reps=shape.steps)
        return
    tokens = shape.pairs * 2 * (shape.prompt + shape.response)
    per_token = flops_per_token(shape)
    print(f"{versions}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (the malloc of both sides)")
    print(
        f"model: Llama d={shape.d} L={shape.layers} heads {shape.heads}/{shape.kv_heads} "
        f"ffn {shape.ffn} V={shape.vocab} f32, P={matmul_params(shape)} matmul weights; "
        f"{shape.pairs} pairs x ({shape.prompt} prompt + {shape.response} response) tokens = "
        f"{tokens} tokens per step; 1 + {shape.steps} steps per side, {args.repeats} repeats"
    )
    print(
        f"FLOPs/token = 8 P + 16 L T D = {per_token:.4g} (policy fwd+bwd 6P, reference fwd 2P, "
        "attention 4LTD per forward x 4)"
    )
    runs = {"jaxalign": []}
    if args.also_impl:
        runs[f"jaxalign/{args.also_impl}"] = []
    runs["TRL"] = []
    peaks = []
    sides = {"jaxalign": "auto"} | (
        {f"jaxalign/{args.also_impl}": args.also_impl} if args.also_impl else {}
    )
    for r in range(args.repeats):
        sub = directory / f"run{r}"
        for name, impl in sides.items():  # each side after a GEMM-peak measurement of its own
            peaks.append(gemm_peak(shape.peak_n, args.peak_reps))
            workdir = sub / name.replace("/", "-")
            times = run_jaxalign(shape, model_dir, directory / "pairs.jsonl", workdir, impl)
            runs[name].append(steady(times))
        if trl is not None:
            peaks.append(gemm_peak(shape.peak_n, args.peak_reps))
            runs["TRL"].append(steady(run_trl(shape, model_dir, pairs, sub / "trl")))
    if trl is None:
        print(f"TRL half skipped: {why}")
        del runs["TRL"]
    peak = statistics.median(peaks)
    print(f"load average after: {os.getloadavg()}")
    print(
        f"GEMM peak: {peak / 1e9:.1f} GFLOP/s (f32 {shape.peak_n}^3 matmul in JAX, median; "
        f"before each side and repeat {', '.join(f'{p / 1e9:.1f}' for p in peaks)})"
    )
    print(
        f"\n{'side':<14}{'tokens':>8}{'step s':>9}{'tokens/s':>10}{'GFLOP/s':>9}"
        f"{'of peak':>9}{'first step s':>14}"
    )
    summary = {}
    for name, repeats in runs.items():
        expected = tokens if name == "TRL" else tokens - 2 * shape.pairs  # positions per step
        for r in repeats:
            if r["tokens"] != expected:
                raise SystemExit(f"{name} ran {r['tokens']} positions per step, not {expected}")
        step = statistics.median(r["step_s"] for r in repeats)
        first = statistics.median(r["first_s"] for r in repeats)
        rate = tokens / step
        summary[name] = rate
        print(
            f"{name:<14}{tokens:>8}{step:>9.3f}{rate:>10.0f}{rate * per_token / 1e9:>9.1f}"
            f"{rate * per_token / peak:>9.1%}{first:>14.2f}"
        )
        per_repeat = ", ".join(f"{tokens / r['step_s']:.0f}" for r in repeats)
        print(f"  per repeat tokens/s: {per_repeat}")
    if "TRL" in summary:
        print(f"\nratio jaxalign / TRL tokens/s: {summary['jaxalign'] / summary['TRL']:.2f}x")
    if args.also_impl:
        other = summary[f"jaxalign/{args.also_impl}"]
        print(
            f"ratio jaxalign / jaxalign with {args.also_impl}: {summary['jaxalign'] / other:.2f}x"
        )


if __name__ == "__main__":
    main()
