"""GRPO step speed: jaxalign's online loop vs TRL's `GRPOTrainer`, side by side on this CPU.

    python benchmarks/grpo.py            # Llama d=256 L=4 heads 8/4 ffn 1024 V=32000 f32; 8 prompts
                                         #   x group 8, prompt 64 tokens, 128 new tokens, 3 steps
    python benchmarks/grpo.py --quick    # a small configuration (a test runs it)
    python benchmarks/grpo.py --steps 5  # more timed steps per side
    python benchmarks/grpo.py --skip-trl # jaxalign's side only

One random-init Llama is written once as a Hugging Face directory, with a word-level tokenizer
over its whole vocabulary (`tokenizer.json`, ids 0-2 `<pad> <s> </s>`, then words `w3`...), and
both sides start from it: jaxalign through `jaxalign train`'s loop (`jaxalign.train.train`, the
GRPO family, `model.init_from=hf:DIR`), TRL through `GRPOTrainer` (transformers generate, no
vLLM). Same prompts (random words: prompt length tokens with BOS), same group size, prompts per
step and completion length, temperature 1 without truncation, the same rule reward (the
`length` reward of `jaxalign.rl.rewards`: a tent around a character count, constant time), KL to
the reference as a k3 loss term (beta 0.04), per-sequence token-mean aggregation (TRL
`loss_type="grpo"`), group-normalised advantages, clip 0.2, one update per step. The random
model's next-token distribution is close to uniform over V, so EOS (1 of V ids) almost never
ends a completion early, and a decode loop runs until every row is done either way: both
generate the full length (mean lengths printed).

Timing: each side runs 1 + `--steps` steps; the first (jaxalign: compilation; TRL: warm-up) is
reported apart and the others' median gives steps/s and completion tokens/s (prompts x group x
new / step time). Rollout = sampling, rewards, old / reference log-probs and advantages
(jaxalign's `time/rollout_s`, TRL's `_generate_and_score_completions`); update = the rest of
the step. The sides run one after the other in this process (jaxalign, then TRL), on all CPU
threads; the load average is printed, since these machines are shared.

Without TRL installed (`pip install 'jaxalign[bench]'`) the TRL half is skipped with a message.
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
KL_BETA = 0.04
LR = 1e-6


@dataclasses.dataclass(frozen=True)
class Shape:
    d: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    prompts: int  # per step
    group: int
    prompt: int  # tokens, BOS included
    new: int
    steps: int  # timed steps per side, after the first


FULL = Shape(
    d=256,
    layers=4,
    heads=8,
    kv_heads=4,
    ffn=1024,
    vocab=32000,
    prompts=8,
    group=8,
    prompt=64,
    new=128,
    steps=3,
)
QUICK = Shape(
    d=64,
    layers=2,
    heads=4,
    kv_heads=2,
    ffn=128,
    vocab=1024,
    prompts=2,
    group=4,
    prompt=16,
    new=16,
    steps=2,
)


def length_params(shape: Shape) -> dict:
    """The rule reward of both sides, `jaxalign.rl.rewards.length_reward`: a tent of half-width
    4 x `new` characters around 6 x `new` (words `w1234 ` are about 6 characters)."""
    return {"target": 6.0 * shape.new, "scale": 4.0 * shape.new}


def write_prompts(shape: Shape, path: pathlib.Path, count: int = 256) -> list[str]:
    """`count` prompts of `prompt - 1` random words (+ BOS = `prompt` tokens), as JSONL."""
    rng = np.random.default_rng(0)
    prompts = [
        " ".join(f"w{i}" for i in rng.integers(3, shape.vocab, shape.prompt - 1))
        for _ in range(count)
    ]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return prompts


def run_jaxalign(shape: Shape, model_dir: pathlib.Path, prompts: pathlib.Path, workdir) -> dict:
    """1 + steps GRPO steps of `jaxalign.train.train`; per-step times from its metrics."""
    from jaxalign.config import apply_overrides, load_config
    from jaxalign.train import train

    rewards = (("length", 1.0, length_params(shape)),)
    config = apply_overrides(
        load_config(str(ROOT / "configs/grpo/tiny.py")),
        [
            f"model.init_from=hf:{model_dir}",
            f"tokenizer={model_dir / 'tokenizer.json'}",
            f"data.train={prompts}",
            "data.eval=",
            f"data.batch_size={shape.prompts}",
            f"data.max_prompt_len={shape.prompt}",
            f"rl.group_size={shape.group}",
            f"rl.max_new_tokens={shape.new}",
            "rl.temperature=1.0",
            f"rl.rewards={rewards!r}",
            f"rl.kl_coef={KL_BETA}",
            "rl.aggregation=seq-mean-token-mean",
            "rl.scale_rewards=group",
            f"optimizer.lr={LR}",
            "optimizer.weight_decay=0.0",
            f"steps={1 + shape.steps}",
            "log_every=1",
            "eval_every=0",
            "checkpoint.every=1000000",
            "checkpoint.async_save=False",
        ],
    )
    train(config, workdir)
    records = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    records = [r for r in records if r["split"] == "train"]
    return {
        "rollout_s": [r["time/rollout_s"] for r in records],
        "update_s": [r["time/update_s"] for r in records],
        "mean_length": [r["completions/mean_length"] for r in records],
    }


def run_trl(shape: Shape, model_dir: pathlib.Path, prompts: list[str], outdir) -> dict:
    """1 + steps GRPO steps of TRL's GRPOTrainer; step and rollout times from a callback and a
    timer around `_generate_and_score_completions`."""
    import datasets
    import torch
    import transformers
    import trl

    from jaxalign.rl.rewards import length_reward

    reward = length_reward(**length_params(shape))

    def length(completions, **kwargs):
        return [reward({}, c) for c in completions]

    args = trl.GRPOConfig(
        output_dir=str(outdir),
        per_device_train_batch_size=shape.prompts * shape.group,
        num_generations=shape.group,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=shape.new,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=KL_BETA,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
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
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[length],
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
    )
    times = {"rollout_s": [], "step_s": [], "mean_length": []}
    generate_and_score = trainer._generate_and_score_completions

    def timed(batch):
        t0 = time.perf_counter()
        out = generate_and_score(batch)
        times["rollout_s"].append(time.perf_counter() - t0)
        times["mean_length"].append(float(out["completion_mask"].sum(1).float().mean()))
        return out

    trainer._generate_and_score_completions = timed

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times["step_s"].append(time.perf_counter() - self.t0)

    trainer.add_callback(StepTimer())
    trainer.train()
    times["update_s"] = [s - r for s, r in zip(times["step_s"], times["rollout_s"], strict=True)]
    return times


def summarise(times: dict, shape: Shape) -> dict:
    """First step apart; steps/s, tokens/s, rollout and update seconds from the median step."""
    step = [r + u for r, u in zip(times["rollout_s"], times["update_s"], strict=True)]
    steady = step[1:]
    median = statistics.median(steady)
    tokens = shape.prompts * shape.group * shape.new
    return {
        "first_s": step[0],
        "step_s": median,
        "steps_per_s": 1.0 / median,
        "tokens_per_s": tokens / median,
        "rollout_s": statistics.median(times["rollout_s"][1:]),
        "update_s": statistics.median(times["update_s"][1:]),
        "mean_length": float(np.mean(times["mean_length"])),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small configuration (seconds)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per side (after one)")
    ap.add_argument("--skip-trl", action="store_true", help="only jaxalign's side")
    args = ap.parse_args()
    shape = QUICK if args.quick else FULL
    if args.steps is not None:
        shape = dataclasses.replace(shape, steps=max(1, args.steps))

    import jax

    trl, missing = None, "--skip-trl"
    if not args.skip_trl:
        try:
            import torch
            import trl
        except ImportError as e:
            missing = f"{e.name} is not installed (pip install 'jaxalign[bench]')"
    directory = pathlib.Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    model_dir = directory / "model"
    write_model_dir(shape, model_dir, positions=shape.prompt + shape.new)
    prompts = write_prompts(shape, directory / "prompts.jsonl")
    versions = f"jax {jax.__version__}"
    if trl is not None:
        versions += f", trl {trl.__version__}, torch {torch.__version__}"
        torch.set_num_threads(os.cpu_count())
    print(f"{versions}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (the malloc of both sides)")
    print(
        f"model: Llama d={shape.d} L={shape.layers} heads {shape.heads}/{shape.kv_heads} "
        f"ffn {shape.ffn} V={shape.vocab} f32; {shape.prompts} prompts x group {shape.group}, "
        f"prompt {shape.prompt} tokens, {shape.new} new tokens; 1 + {shape.steps} steps per side"
    )
    sides = {
        "jaxalign": summarise(
            run_jaxalign(shape, model_dir, directory / "prompts.jsonl", directory / "jaxalign"),
            shape,
        )
    }
    if trl is None:
        print(f"TRL half skipped: {missing}")
    else:
        sides["TRL"] = summarise(run_trl(shape, model_dir, prompts, directory / "trl"), shape)
    print(f"load average after: {os.getloadavg()}")
    print(
        f"\n{'side':<10}{'steps/s':>9}{'tokens/s':>10}{'step s':>8}{'rollout s':>11}"
        f"{'update s':>10}{'first step s':>14}{'mean length':>13}"
    )
    for name, s in sides.items():
        print(
            f"{name:<10}{s['steps_per_s']:>9.3f}{s['tokens_per_s']:>10.0f}{s['step_s']:>8.2f}"
            f"{s['rollout_s']:>11.2f}{s['update_s']:>10.2f}{s['first_s']:>14.2f}"
            f"{s['mean_length']:>13.1f}"
        )
    if "TRL" in sides:
        ours, theirs = sides["jaxalign"], sides["TRL"]
        print(
            f"\nratio jaxalign / TRL: steps/s {ours['steps_per_s'] / theirs['steps_per_s']:.2f}x "
            f"(rollout {theirs['rollout_s'] / ours['rollout_s']:.2f}x, update "
            f"{theirs['update_s'] / ours['update_s']:.2f}x faster)"
        )


if __name__ == "__main__":
    main()
