"""`jaxalign` command line: train, eval, generate, convert, bench.

    jaxalign train --config configs/dpo/tiny.py --workdir runs/dpo-tiny --config.loss.beta=0.2
    jaxalign eval --config configs/dpo/tiny.py --workdir runs/dpo-tiny
    jaxalign cache-ref --config configs/dpo/tiny.py --workdir runs/dpo-tiny [--out FILE]
    jaxalign generate --model checkpoint:runs/sft-tiny --prompts FILE.jsonl --out FILE.jsonl
    jaxalign convert from-hf --hf DIR --out CKPT
    jaxalign convert to-hf --checkpoint CKPT --out DIR [--tokenizer FILE] [--dtype bfloat16]
    jaxalign bench logprobs|generate [-- benchmark flags]

Errors a user can act on print one line, `jaxalign: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.key=value` (or `--config.key value`) overrides from the other flags."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise SystemExit(f"jaxalign: {arg} needs a value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _load(args, overrides):
    from jaxalign.config import apply_overrides, load_config

    config = load_config(args.config)
    return apply_overrides(config, overrides, source=args.config.partition(":")[0])


def _cmd_train(args, overrides):
    from jaxalign.sharding import distributed
    from jaxalign.train import train

    distributed.initialize()
    config = _load(args, overrides)
    if args.compile_only:
        from jaxalign.train.plan import compile_plan

        compile_plan(config, topology=args.topology)
        return
    result = train(config, args.workdir)
    if result["preempted"]:
        sys.exit(143)


def _cmd_eval(args, overrides):
    from jaxalign.train import evaluate_checkpoint

    metrics = evaluate_checkpoint(_load(args, overrides), args.workdir)
    for key, value in sorted(metrics.items()):
        print(f"{key}: {value:.6g}")


def _cmd_cache_ref(args, overrides):
    import pathlib

    from jaxalign.train.cache_ref import cache_reference

    out = args.out or str(pathlib.Path(args.workdir) / "ref_logps.jsonl")
    counts = cache_reference(_load(args, overrides), out)
    for path, n in counts.items():
        print(f"{path}: {n} records")
    print(f"wrote {out}; train with --config.data.ref_logps={out}")


def _cmd_generate(args, overrides):
    from jaxalign.sampling.cli_generate import run

    if overrides:
        raise SystemExit("jaxalign: generate takes no --config overrides")
    n = run(args)
    print(f"wrote {n} completions to {args.out}")


def _cmd_convert(args, overrides):
    from jaxalign.checkpoint import convert

    if overrides:
        raise SystemExit("jaxalign: convert takes no --config overrides")
    if args.direction == "from-hf":
        convert.from_hf(args.hf, args.out, dtype=args.dtype)
    else:
        convert.to_hf(args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=args.dtype)
    print(f"wrote {args.out}")


def _cmd_bench(args, overrides):
    scripts = {"logprobs": "benchmarks/logprobs.py", "generate": "benchmarks/generate.py"}
    script = scripts[args.name]
    if not os.path.isfile(script):
        raise SystemExit(f"jaxalign: {script} not found (run from the repository root)")
    sys.argv = [script, *args.rest]
    runpy.run_path(script, run_name="__main__")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxalign", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (or resume) a run from a config")
    train.add_argument("--config", required=True, help="configs/<family>/<name>.py[:arg]")
    train.add_argument("--workdir", help="run directory: checkpoints, metrics.jsonl, tensorboard")
    train.add_argument(
        "--compile_only",
        action="store_true",
        help="compile the train step for the config's preset and mesh, print memory and FLOPs",
    )
    train.add_argument(
        "--topology", default="", help="with --compile_only: a TPU topology to compile for"
    )
    train.set_defaults(run=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate the latest checkpoint of a run on data.eval")
    ev.add_argument("--config", required=True)
    ev.add_argument("--workdir", required=True)
    ev.set_defaults(run=_cmd_eval)

    cache = sub.add_parser(
        "cache-ref",
        help="compute the reference policy's log-probs of data.train and data.eval once",
    )
    cache.add_argument("--config", required=True)
    cache.add_argument("--workdir", help="run directory; the cache goes to DIR/ref_logps.jsonl")
    cache.add_argument("--out", help="the cache file (JSONL; default DIR/ref_logps.jsonl)")
    cache.set_defaults(run=_cmd_cache_ref)

    gen = sub.add_parser(
        "generate", help="sample completions for a JSONL file of prompts (jaxalign.sampling)"
    )
    gen.add_argument("--model", required=True, help="hf:DIR or checkpoint:RUN_DIR")
    gen.add_argument("--prompts", required=True, help='JSONL of {"prompt": ...} records')
    gen.add_argument("--out", required=True, help="output JSONL (written atomically)")
    gen.add_argument("--tokenizer", help="default: the run's recorded / the HF dir's tokenizer")
    gen.add_argument("--template", help="plain | chatml | llama3 (default: the run's, or plain)")
    gen.add_argument("--max_new_tokens", type=int, default=128)
    gen.add_argument("--n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top_k", type=int, default=0, help="0 = off")
    gen.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    gen.add_argument("--min_p", type=float, default=0.0, help="0 = off")
    gen.add_argument("--repetition_penalty", type=float, default=1.0, help="1 = off")
    gen.add_argument("--presence_penalty", type=float, default=0.0, help="0 = off")
    gen.add_argument("--stop", nargs="+", action="extend", help="stop strings")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch_size", type=int, default=16, help="prompts per generate call")
    gen.add_argument("--best_of", type=int, default=0, help="sample N, keep the best by --reward")
    gen.add_argument("--worst", action="store_true", help="with --best_of: keep the worst")
    gen.add_argument("--reward", help="with --best_of: a reward name (demo_judge)")
    gen.set_defaults(run=_cmd_generate)

    conv = sub.add_parser("convert", help="convert checkpoints to and from Hugging Face format")
    conv.add_argument("direction", choices=["from-hf", "to-hf"])
    conv.add_argument("--hf", help="from-hf: Hugging Face model directory")
    conv.add_argument("--checkpoint", help="to-hf: a run directory or converted checkpoint")
    conv.add_argument("--out", required=True)
    conv.add_argument("--tokenizer", help="to-hf: tokenizer file(s) directory to ship along")
    conv.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    conv.set_defaults(run=_cmd_convert)

    bench = sub.add_parser("bench", help="run a benchmark script from benchmarks/")
    bench.add_argument("name", choices=["logprobs", "generate"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    from jaxalign.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    if args.command == "train" and not args.compile_only and not args.workdir:
        raise SystemExit("jaxalign: train needs --workdir")
    if args.command == "cache-ref" and not (args.out or args.workdir):
        raise SystemExit("jaxalign: cache-ref needs --out or --workdir")
    if args.command == "convert":
        needed = "hf" if args.direction == "from-hf" else "checkpoint"
        if not getattr(args, needed):
            raise SystemExit(f"jaxalign: convert {args.direction} needs --{needed}")
    try:
        args.run(args, overrides)
    except UserError as e:
        print(f"jaxalign: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
