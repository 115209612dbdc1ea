"""Generation speed: jaxalign.sampling.generate vs transformers' generate, side by side, and the
arithmetic bound of this CPU.

    python benchmarks/generate.py              # CPU: Llama d=256 L=4 heads 8/4 ffn 1024
                                               #   V=32000 f32, batch 16, prompt 64, 128 new
    python benchmarks/generate.py --quick      # a small configuration (seconds; a test runs it)
    python benchmarks/generate.py --gpu        # GPU: qwen3-0.6b preset, bf16, batch 64 and 256,
                                               #   tokens/s vs the HBM-bandwidth bound
    python benchmarks/generate.py --gpu --dry_run   # the GPU shapes, traced only (any machine)

CPU mode. One random-init Llama is written once as a Hugging Face directory and loaded by both
(`AutoModelForCausalLM.from_pretrained`, `jaxalign.checkpoint.load_hf`); both get the same
prompts (random ids, no padding) and generate exactly ``new`` tokens per row (no EOS), greedy and
sampled (temperature 1, no truncation). Runs are interleaved (jaxalign, transformers, ...) and
the median is reported, as tokens/s = batch x new / seconds. jaxalign's compile time (first call
minus a steady call) is reported separately. The bound: the matmul FLOPs of one decode step
(weights 2 x params x rows, attention 2 x 2 x context x N x H x L x rows at the mean context)
divided by this CPU's GEMM rate, measured here with a 2048^3 float32 matmul.

GPU mode. tokens/s of jaxalign alone at each batch, and the HBM bound: every decode step reads
all weights once and the whole KV cache (the loop attends over all Tp + new slots), so
tokens/s <= rows x bandwidth / (weight bytes + cache bytes); bandwidth from ``--hbm_gbps`` or
the device name.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import models as M
from jaxalign.sampling import SamplingOptions, engine, generate, prompts_from_ids
from jaxalign.sharding import ShardingRules

HBM_GBPS = {"H200": 4800, "H100": 3350, "A100": 2039, "L4": 300, "A10": 600}  # peak, GB/s


@dataclasses.dataclass(frozen=True)
class Shape:
    d: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    batch: int
    prompt: int
    new: int
    reps: int


FULL = Shape(
    d=256,
    layers=4,
    heads=8,
    kv_heads=4,
    ffn=1024,
    vocab=32000,
    batch=16,
    prompt=64,
    new=128,
    reps=5,
)
QUICK = Shape(
    d=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=1024, batch=4, prompt=16, new=16, reps=2
)


def matmul_flops_per_token(config: M.ModelConfig, context: float) -> float:
    """Matmul FLOPs to decode one token: 2 x (layer weights + unembedding) + attention scores
    and values (2 x 2 x context x N x H per layer)."""
    D, N, K, H, F, L = (
        config.d_model,
        config.n_heads,
        config.n_kv_heads,
        config.head_dim,
        config.d_ff,
        config.n_layers,
    )
    weights = L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + D * config.vocab_size
    return 2 * weights + L * 2 * 2 * context * N * H


def gemm_rate(n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of an n^3 float32 matmul on the default device (median of ``reps``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def _hf_model_dir(shape: Shape, directory: str) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.d,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.prompt + shape.new,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)


def cpu(shape: Shape) -> None:
    import torch
    import transformers

    from jaxalign.checkpoint import load_hf

    torch.set_num_threads(os.cpu_count())
    directory = tempfile.mkdtemp(prefix="bench-generate-")
    _hf_model_dir(shape, directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    config, params = load_hf(directory)
    ids = np.random.default_rng(0).integers(0, shape.vocab, (shape.batch, shape.prompt))
    prompts = prompts_from_ids(ids.tolist(), pad_id=0, buckets=[shape.prompt])
    input_ids = torch.from_numpy(ids.astype(np.int64))
    modes = {"greedy": dict(temperature=0.0), "sampled (T=1)": dict(temperature=1.0)}

    def run_ours(mode: str, seed: int):
        options = SamplingOptions(max_new_tokens=shape.new, **modes[mode])
        t0 = time.perf_counter()
        result = generate(config, params, prompts, rng=jax.random.key(seed), options=options)
        return time.perf_counter() - t0, result.tokens

    def run_hf(mode: str, seed: int):
        torch.manual_seed(seed)
        sampled = modes[mode]["temperature"] > 0
        sampling = dict(temperature=1.0, top_k=0, top_p=1.0) if sampled else {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=shape.new,
                min_new_tokens=shape.new,
                do_sample=sampled,
                pad_token_id=0,
                **sampling,
            )
        return time.perf_counter() - t0, out[:, shape.prompt :].numpy()

    print(
        f"jax {jax.__version__}, transformers {transformers.__version__}, torch "
        f"{torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()}"
    )
    print(
        f"model: Llama d={shape.d} L={shape.layers} heads {shape.heads}/{shape.kv_heads} "
        f"ffn {shape.ffn} V={shape.vocab} f32; batch {shape.batch}, prompt {shape.prompt}, "
        f"{shape.new} new tokens"
    )
    first, _ = run_ours("greedy", 0)
    steady, _ = run_ours("greedy", 0)
    run_hf("greedy", 0)  # warm-up
    rate = gemm_rate()
    flops = matmul_flops_per_token(config, shape.prompt + shape.new / 2)
    bound = rate / flops
    print(
        f"jaxalign compile: {first - steady:.2f} s; GEMM rate {rate / 1e9:.1f} GFLOP/s "
        f"(2048^3 f32); {flops / 1e6:.1f} MFLOP per token -> bound {bound:.0f} tokens/s"
    )
    tokens = shape.batch * shape.new
    print(
        f"\n{'mode':<16}{'jaxalign tok/s':>16}{'transformers tok/s':>20}{'ratio':>8}"
        f"{'bound tok/s':>13}{'jaxalign/bound':>16}{'same tokens':>13}"
    )
    for mode in modes:
        ours, theirs = [], []
        for rep in range(shape.reps):
            t, ours_tokens = run_ours(mode, rep)
            ours.append(t)
            t, hf_tokens = run_hf(mode, rep)
            theirs.append(t)
        a, b = tokens / statistics.median(ours), tokens / statistics.median(theirs)
        same = "-" if mode != "greedy" else f"{np.mean(ours_tokens == hf_tokens):.3f}"
        print(
            f"{mode:<16}{a:>16.0f}{b:>20.0f}{a / b:>8.2f}{bound:>13.0f}{a / bound:>16.2f}{same:>13}"
        )


def gpu(batches: tuple[int, ...], prompt: int, new: int, hbm_gbps: float | None, dry_run: bool):
    config = M.get_preset("qwen3-0.6b", dtype="bfloat16", param_dtype="bfloat16")
    device = jax.devices()[0]
    if hbm_gbps is None:
        hbm_gbps = next((v for k, v in HBM_GBPS.items() if k in device.device_kind), None)
    print(
        f"device {device.device_kind}; qwen3-0.6b bf16, prompt {prompt}, {new} new tokens; "
        f"HBM {hbm_gbps} GB/s"
    )
    weight_bytes = M.param_count(config) * 2
    print(f"\n{'batch':>6}{'tokens/s':>12}{'bound tok/s':>13}{'fraction':>10}{'compile s':>11}")
    for batch in batches:
        cache_bytes = (
            2 * config.n_layers * batch * (prompt + new) * config.n_kv_heads * config.head_dim * 2
        )
        bound = batch * hbm_gbps * 1e9 / (weight_bytes + cache_bytes) if hbm_gbps else float("nan")
        ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt)).tolist()
        prompts = prompts_from_ids(ids, pad_id=0, buckets=[prompt])
        options = SamplingOptions(max_new_tokens=new, temperature=1.0)
        if dry_run:  # trace and lower the real loop on abstract weights: shapes only
            arrays = {k: prompts[k] for k in engine.PROMPT_KEYS}
            engine._decode_loop.lower(
                (M.abstract_params(config),),
                arrays,
                jax.random.key(0),
                engine.knobs(options),
                (),
                configs=(config,),
                combine=None,
                max_new_tokens=new,
                n=1,
                mesh=None,
                rules=ShardingRules(),
            )
            print(f"{batch:>6}{'(dry run)':>12}{bound:>13.0f}{'-':>10}{'-':>11}")
            continue
        params = jax.jit(M.init_params, static_argnums=0)(config, jax.random.key(0))
        times = []
        for rep in range(4):
            t0 = time.perf_counter()
            generate(config, params, prompts, rng=jax.random.key(rep), options=options)
            times.append(time.perf_counter() - t0)
        steady = statistics.median(times[1:])
        rate = batch * new / steady
        print(
            f"{batch:>6}{rate:>12.0f}{bound:>13.0f}{rate / bound:>10.2f}{times[0] - steady:>11.1f}"
        )
        del params


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small CPU configuration")
    ap.add_argument("--gpu", action="store_true", help="qwen3-0.6b at batch 64 and 256 vs HBM")
    ap.add_argument("--dry_run", action="store_true", help="with --gpu: trace the shapes only")
    ap.add_argument("--hbm_gbps", type=float, default=None, help="peak HBM bandwidth, GB/s")
    args = ap.parse_args()
    if args.gpu:
        gpu((64, 256), prompt=128, new=128, hbm_gbps=args.hbm_gbps, dry_run=args.dry_run)
    else:
        cpu(QUICK if args.quick else FULL)


if __name__ == "__main__":
    main()
