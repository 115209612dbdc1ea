"""`jaxalign` command line: train, eval, generate, diagnose, convert, merge, bench, data inspect,
plot.

    jaxalign train --config configs/dpo/tiny.py --workdir runs/dpo-tiny --config.loss.beta=0.2
    jaxalign eval --workdir runs/dpo-tiny [--config.data.eval=FILE]   # the run's own config
    jaxalign cache-ref --config configs/dpo/tiny.py --workdir runs/dpo-tiny [--out FILE]
    jaxalign generate --model checkpoint:runs/sft-tiny --prompts FILE.jsonl --out FILE.jsonl
    jaxalign generate --config configs/generate/eft.py --prompts FILE.jsonl --out FILE.jsonl
    jaxalign diagnose branching|shift|sweep --model SPEC --prompts FILE.jsonl --out DIR
    jaxalign diagnose honesty --records FILE.jsonl --completions FILE.jsonl --out FILE.json
    jaxalign convert from-hf --hf DIR --out CKPT
    jaxalign convert to-hf --checkpoint CKPT --out DIR [--tokenizer FILE] [--dtype bfloat16]
        [--overwrite] [--adapter]    # --adapter: a LoRA run's adapters as a PEFT directory
    jaxalign merge --config configs/merge/ties.py --out DIR [--config.lam=0.8]
    jaxalign bench logprobs|generate [-- benchmark flags]
    jaxalign data inspect FILE --config CFG [--config.key=value] [--show 3] [--out lengths.png]
    jaxalign data select --in FILE --out FILE --budget N [--max-similarity 0.9]
        [--embedding-field F | --model SPEC [--text-fields prompt completion]]    # deita
    jaxalign plot RUN [RUN ...] --out curves.png

Errors a user can act on print one line, `jaxalign: ...`, and exit with status 2. A run stopped by
SIGTERM or Ctrl-C saves a checkpoint and exits with 128 + the signal number (143, 130); a second
Ctrl-C aborts at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import signal
import sys


def _usage(message: str):
    """A mistake in the command line: one line, status 2 (as argparse's own usage errors)."""
    print(f"jaxalign: {message}", file=sys.stderr)
    sys.exit(2)


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
                    _usage(f"{arg} needs a value")
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
    result = train(config, args.workdir, allow_config_change=args.allow_config_change)
    if result.get("stopped_by"):
        sys.exit(128 + signal.Signals[result["stopped_by"]])


def _cmd_eval(args, overrides):
    """The run's recorded config (WORKDIR/config.json), or --config; overrides on top, named."""
    from jaxalign.config import apply_overrides, to_dict
    from jaxalign.train import evaluate_checkpoint
    from jaxalign.train import workdir as workdirs

    recorded = workdirs.read_config(args.workdir)
    if args.config:
        config = _load(args, overrides)
        if recorded is not None:
            changed = workdirs.config_changes(recorded, config)
            if changed:
                print(
                    f"jaxalign: --config differs from the run in {', '.join(changed)}",
                    file=sys.stderr,
                )
    elif recorded is None:
        _usage(f"{args.workdir}: no config.json (not a jaxalign run directory?); pass --config")
    else:
        config = workdirs.config_from_record(recorded)
        before = to_dict(config)
        config = apply_overrides(config, overrides, source=f"{args.workdir}/config.json")
        changed = workdirs.config_changes(before, config)
        if changed:
            print(f"jaxalign: overriding the run's {', '.join(changed)}", file=sys.stderr)
    metrics = evaluate_checkpoint(config, args.workdir)
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

    if overrides and not args.config:
        _usage("--config.KEY overrides go with --config (a guided-decoding config)")
    n = run(args, overrides)
    print(f"wrote {n} completions to {args.out}")


def _cmd_diagnose(args, overrides):
    from jaxalign.sampling.cli_diagnose import run

    if overrides:
        _usage("diagnose takes no --config overrides")
    for path in run(args):
        print(f"wrote {path}")


def _cmd_convert(args, overrides):
    from jaxalign.checkpoint import convert

    if overrides:
        _usage("convert takes no --config overrides")
    if args.direction == "from-hf":
        convert.from_hf(args.hf, args.out, dtype=args.dtype)
        print(f"wrote {args.out}")
        return
    shipped = convert.to_hf(
        args.checkpoint,
        args.out,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        overwrite=args.overwrite,
        adapter=args.adapter,
    )
    print(f"wrote {args.out}")
    if args.adapter:
        print("PEFT adapter: peft.PeftModel.from_pretrained(base_model, OUT) loads it")
    elif args.tokenizer is None and shipped is not None:
        print(f"tokenizer: {shipped} (recorded by the run; --tokenizer ships another)")
    elif shipped is None:
        recorded = convert.run_tokenizer(args.checkpoint)
        why = f"the run's {recorded} is not found from here" if recorded else "none recorded"
        print(f"tokenizer: none shipped ({why}); pass --tokenizer FILE|DIR")


def _cmd_merge(args, overrides):
    from jaxalign.merge.driver import merge

    report = merge(_load(args, overrides), args.out, source=args.config.partition(":")[0])
    mb = 1 / 2**20
    print(f"wrote {args.out} ({report.n_tensors} tensors, {report.model_bytes * mb:.1f} MiB)")
    print(
        f"memory: peak tensors held {report.peak_tensor_bytes * mb:.1f} MiB "
        f"({report.peak_tensor_bytes / report.model_bytes:.1%} of one model); "
        f"process peak RSS {report.peak_rss_bytes * mb:.0f} MiB"
    )
    print(f"tokenizer: {report.tokenizer or 'none shipped (set tokenizer in the config)'}")
    if report.restored is not None:
        shown = ", ".join(report.restored[:4]) + (", ..." if len(report.restored) > 4 else "")
        print(f"restored {len(report.restored)} of {report.n_tensors} tensors: {shown or 'none'}")


def _cmd_bench(args, overrides):
    scripts = {"logprobs": "benchmarks/logprobs.py", "generate": "benchmarks/generate.py"}
    script = scripts[args.name]
    if not os.path.isfile(script):
        _usage(f"{script} not found (run from the repository root)")
    sys.argv = [script, *args.rest]
    runpy.run_path(script, run_name="__main__")


def _cmd_data_inspect(args, overrides):
    from jaxalign.data.inspect import inspect_data, plot_lengths, report

    if args.show < 0:
        _usage(f"--show {args.show}: expected a number of examples >= 0")
    config = _load(args, overrides)
    inspection = inspect_data(args.file, config, show=args.show)
    print(report(inspection, config))
    if args.out:
        plot_lengths(inspection, config, args.out)
        print(f"wrote {args.out}")


def _cmd_data_select(args, overrides):
    from jaxalign.data import select

    if overrides:
        _usage("data select takes no --config overrides")
    if bool(args.embedding_field) == bool(args.model):
        _usage("data select needs one of --embedding-field and --model")
    records = select.read_records(args.input)
    scores = select.deita_scores(
        select.record_numbers(args.input, records, args.complexity_field),
        select.record_numbers(args.input, records, args.quality_field),
    )
    if args.embedding_field:
        embeddings = select.record_embeddings(args.input, records, args.embedding_field)
    else:
        from jaxalign.sampling.cli_generate import _tokenizer, load_model

        config, params, tokenizer_path, _ = load_model(args.model)
        tokenizer = _tokenizer(args.tokenizer or tokenizer_path, config)
        texts = select.record_texts(args.input, records, tuple(args.text_fields))
        embeddings = select.mean_hidden(config, params, [tokenizer.encode(t) for t in texts])
    kept = select.greedy_select(
        scores, embeddings, budget=args.budget, max_similarity=args.max_similarity
    )
    select.write_selection(args.out, records, kept)
    print(f"wrote {args.out}: {len(kept)} of {len(records)} records")


def _cmd_plot(args, overrides):
    from jaxalign.plot import plot_runs

    if overrides:
        _usage("plot takes no --config overrides")
    names = plot_runs(args.runs, args.out)
    print(f"wrote {args.out} ({', '.join(names)})")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The `SamplingOptions` flags of generate and diagnose. They default to None: an unset one
    takes the guided config's sampling value, else SamplingOptions' default (shown)."""
    parser.add_argument("--max_new_tokens", type=int, help="default 128")
    parser.add_argument("--n", type=int, help="samples per prompt (default 1)")
    parser.add_argument("--temperature", type=float, help="default 1.0; 0 = greedy")
    parser.add_argument("--top_k", type=int, help="default 0 = off")
    parser.add_argument("--top_p", type=float, help="default 1 = off")
    parser.add_argument("--min_p", type=float, help="default 0 = off")
    parser.add_argument("--repetition_penalty", type=float, help="default 1 = off")
    parser.add_argument("--presence_penalty", type=float, help="default 0 = off")
    parser.add_argument("--stop", nargs="+", action="extend", help="stop strings")
    parser.add_argument("--seed", type=int, help="default 0")


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
    train.add_argument(
        "--allow_config_change",
        action="store_true",
        help="continue the run in --workdir although its recorded config differs",
    )
    train.set_defaults(run=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate the latest checkpoint of a run on data.eval")
    ev.add_argument("--workdir", required=True, help="the run directory")
    ev.add_argument("--config", help="evaluate with this config instead of the run's recorded one")
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
    gen.add_argument("--model", help="hf:DIR or checkpoint:RUN_DIR")
    gen.add_argument(
        "--config", help="guided decoding: configs/generate/{eft,nudging,genarm}.py[:arg]"
    )
    gen.add_argument("--prompts", required=True, help='JSONL of {"prompt": ...} records')
    gen.add_argument("--out", required=True, help="output JSONL (written atomically)")
    gen.add_argument("--tokenizer", help="default: the run's recorded / the HF dir's tokenizer")
    gen.add_argument("--template", help="plain | chatml | llama3 (default: the run's, or plain)")
    _add_sampling_flags(gen)
    gen.add_argument("--batch_size", type=int, default=16, help="prompts per generate call")
    gen.add_argument("--best_of", type=int, default=0, help="sample N, keep the best by --reward")
    gen.add_argument("--worst", action="store_true", help="with --best_of: keep the worst")
    gen.add_argument("--reward", help="with --best_of: a reward name (demo_judge)")
    gen.add_argument("--reward_model", help="with --best_of: a reward model run directory")
    gen.add_argument(
        "--direction", help="with --reward_model (multi-objective): v1,v2,... (scores v . r)"
    )
    gen.add_argument(
        "--samples_field",
        help="write each prompt record once, its --n completions as a list under this field "
        "(e.g. samples: D2O's negatives records)",
    )
    gen.set_defaults(run=_cmd_generate)

    diag = sub.add_parser(
        "diagnose",
        help="decoding diagnostics: branching factor, token shift, decoding sweep (JSON + PNG); "
        "honesty metrics (JSON)",
    )
    diag.add_argument("kind", choices=["branching", "shift", "sweep", "honesty"])
    diag.add_argument("--model", action="append", help="hf:DIR|checkpoint:RUN (branching: repeat)")
    diag.add_argument("--base", help="shift: the base model ranking the tokens")
    diag.add_argument("--aligned", help="shift: the aligned model that decodes")
    diag.add_argument("--prompts", help='JSONL of {"prompt": ...} records (not honesty)')
    diag.add_argument(
        "--out", required=True, help="directory for <kind>.json and <kind>.png; honesty: the JSON"
    )
    diag.add_argument("--tokenizer", help="default: the first model's recorded tokenizer")
    diag.add_argument("--template", help="plain | chatml | llama3 (default: the run's, or plain)")
    diag.add_argument("--batch_size", type=int, default=16, help="prompts per generate call")
    diag.add_argument("--reward", help="sweep: a reward name (demo_judge)")
    diag.add_argument("--temperatures", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    diag.add_argument("--top_ps", type=float, nargs="+", default=[0.5, 0.9, 1.0])
    diag.add_argument("--top_ks", type=int, nargs="+", default=[0, 5, 50], help="0 = off")
    diag.add_argument("--records", help='honesty: JSONL of {"prompt", "answer", "known"}')
    diag.add_argument("--completions", help="honesty: jaxalign generate's output on --records")
    diag.add_argument(
        "--abstain_pattern",
        action="append",
        help="honesty: an abstention regex (repeat; replaces the default list)",
    )
    _add_sampling_flags(diag)
    diag.set_defaults(run=_cmd_diagnose)

    conv = sub.add_parser("convert", help="convert checkpoints to and from Hugging Face format")
    conv.add_argument("direction", choices=["from-hf", "to-hf"])
    conv.add_argument("--hf", help="from-hf: Hugging Face model directory")
    conv.add_argument("--checkpoint", help="to-hf: a run directory or converted checkpoint")
    conv.add_argument("--out", required=True)
    conv.add_argument(
        "--tokenizer",
        help="to-hf: tokenizer file or directory to ship (default: the one the run recorded)",
    )
    conv.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    conv.add_argument("--overwrite", action="store_true", help="to-hf: replace an existing --out")
    conv.add_argument(
        "--adapter",
        action="store_true",
        help="to-hf of a LoRA run: write its adapters as a PEFT adapter directory (default: the "
        "adapters merged into the base, a full model)",
    )
    conv.set_defaults(run=_cmd_convert)

    merge = sub.add_parser(
        "merge", help="merge models in weight space (soup, task arithmetic, TIES, DARE, SLERP)"
    )
    merge.add_argument("--config", required=True, help="configs/merge/<name>.py[:arg]")
    merge.add_argument("--out", required=True, help="the Hugging Face directory to write")
    merge.set_defaults(run=_cmd_merge)

    bench = sub.add_parser("bench", help="run a benchmark script from benchmarks/")
    bench.add_argument("name", choices=["logprobs", "generate"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_cmd_bench)

    data = sub.add_parser("data", help="look at a data file before training on it")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    inspect = data_sub.add_parser(
        "inspect",
        help="records, token lengths, truncation and the first examples of FILE under a config",
    )
    inspect.add_argument("file", help="JSONL / Parquet / Arrow / ArrayRecord, a directory or glob")
    inspect.add_argument("--config", required=True, help="configs/<family>/<name>.py[:arg]")
    inspect.add_argument("--show", type=int, default=3, help="examples to render (default 3)")
    inspect.add_argument("--out", help="also draw the length histograms to this PNG")
    inspect.set_defaults(run=_cmd_data_inspect)
    select = data_sub.add_parser(
        "select",
        help="deita: keep the best-scored (complexity x quality) diverse records of a JSONL file",
    )
    select.add_argument("--in", dest="input", required=True, help="the JSONL records")
    select.add_argument("--out", required=True, help="the JSONL file to write (atomically)")
    select.add_argument("--budget", type=int, required=True, help="records to keep (at most)")
    select.add_argument(
        "--max-similarity",
        type=float,
        default=0.9,
        help="keep a record only if its cosine similarity to every kept one is below this "
        "(default 0.9)",
    )
    select.add_argument("--complexity-field", default="complexity", help="default complexity")
    select.add_argument("--quality-field", default="quality", help="default quality")
    select.add_argument("--embedding-field", help="a field holding each record's embedding")
    select.add_argument("--model", help="hf:DIR | checkpoint:RUN: embed by mean hidden state")
    select.add_argument("--tokenizer", help="with --model: overrides the model's own tokenizer")
    select.add_argument(
        "--text-fields",
        nargs="+",
        default=["prompt", "completion"],
        help="with --model: the string fields embedded, joined by a newline",
    )
    select.set_defaults(run=_cmd_data_select)

    plot = sub.add_parser("plot", help="draw the training curves of runs (metrics.jsonl)")
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or metrics files)")
    plot.add_argument("--out", required=True, help="the image to write (PNG)")
    plot.set_defaults(run=_cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> None:
    from jaxalign.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    if args.command == "train" and not args.compile_only and not args.workdir:
        _usage("train needs --workdir")
    if args.command == "cache-ref" and not (args.out or args.workdir):
        _usage("cache-ref needs --out or --workdir")
    if args.command == "convert":
        needed = "hf" if args.direction == "from-hf" else "checkpoint"
        if not getattr(args, needed):
            _usage(f"convert {args.direction} needs --{needed}")
    # Orbax and JAX log through absl; their routine warnings would repeat on every checkpoint.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        args.run(args, overrides)
    except UserError as e:
        print(f"jaxalign: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("jaxalign: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
