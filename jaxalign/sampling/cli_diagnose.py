"""`jaxalign diagnose`: decoding diagnostics of `jaxalign.sampling.diagnostics` on a JSONL file of
prompts, each written as ``OUT/<name>.json`` (the table) and ``OUT/<name>.png`` (its plot).

    jaxalign diagnose branching --model checkpoint:runs/demo/sft --model checkpoint:runs/demo/dpo \\
        --prompts data/demo/prompts_eval.jsonl --out runs/demo/diagnostics --n 4
    jaxalign diagnose shift --base checkpoint:runs/demo/sft --aligned checkpoint:runs/demo/dpo \\
        --prompts data/demo/prompts_eval.jsonl --out runs/demo/diagnostics --temperature 0
    jaxalign diagnose sweep --model checkpoint:runs/demo/dpo --reward demo_judge \\
        --prompts data/demo/prompts_eval.jsonl --out runs/demo/diagnostics --n 4 \\
        --temperatures 0.3 0.7 1.0 --top_ps 0.9 1.0 --top_ks 0 5
    jaxalign diagnose honesty --records data/demo/honesty_eval.jsonl \\
        --completions runs/honesty/completions.jsonl --out runs/honesty/honesty.json

- ``branching``: n samples per prompt from each ``--model`` with the sampling flags; the
  branching factor by position and overall (``branching.json``, one line per model in
  ``branching.png``).
- ``shift``: the ``--aligned`` model decodes with the sampling flags (``--temperature 0`` for
  greedy, as the token-shift analysis does); each token is ranked under ``--base``
  (``shift.json``, ``shift.png``). The two models must share the vocabulary.
- ``sweep``: n samples per prompt under every (temperature, top-p, top-k) of the grid, scored by
  ``--reward`` (``sweep.json``, ``sweep.png``); the other sampling flags apply to every setting.
- ``honesty``: prudence, over-conservativeness and known-question accuracy
  (`jaxalign.sampling.honesty`) of ``--completions`` (`jaxalign generate`'s output) on the
  ``--records`` they answer; ``--out`` is the JSON file itself. ``--abstain_pattern REGEX``
  (repeatable) replaces the default abstention patterns. No model is loaded.

Tokenizer and template: the first model's recorded ones unless ``--tokenizer`` / ``--template``.
Generation runs on one device; batch b of setting s uses ``fold_in(fold_in(key(seed), s), b)``
(branching and shift: s = 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import jax
import numpy as np

from jaxalign.data import make_prompt_pipeline
from jaxalign.errors import ConfigError
from jaxalign.sampling import diagnostics as D
from jaxalign.sampling import honesty as H
from jaxalign.sampling.best_of_n import get_reward
from jaxalign.sampling.cli_generate import _tokenizer, load_model, options_from_args
from jaxalign.sampling.engine import check_prompt_lengths, generate
from jaxalign.sampling.guided import check_vocabularies


def _setup(args, specs: list[str]):
    """Loaded models (spec -> (config, params)), tokenizer, sampling options, prompt batches and
    the record names of each batch."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size}: expected >= 1")
    loaded = {spec: load_model(spec) for spec in specs}
    first = loaded[specs[0]]
    tokenizer = _tokenizer(args.tokenizer or first[2], first[0])
    for config, *_ in loaded.values():
        _tokenizer(args.tokenizer or first[2], config)  # its ids fit every model
    template = args.template or first[3] or "plain"
    options = options_from_args(args, tokenizer)
    max_seq_len = min(m[0].max_seq_len for m in loaded.values())
    pipeline = make_prompt_pipeline(
        args.prompts,
        tokenizer,
        batch_size=args.batch_size,
        max_prompt_len=max_seq_len,
        shuffle=False,
        num_epochs=1,
        template=template,
    )
    batches = list(pipeline)

    def names(b):
        start = b * args.batch_size
        return [f"{args.prompts} record {start + i + 1}" for i in range(args.batch_size)]

    for b, batch in enumerate(batches):
        check_prompt_lengths(batch["prompt_lengths"], options.max_new_tokens, max_seq_len, names(b))
    models = {spec: m[:2] for spec, m in loaded.items()}
    return models, tokenizer, options, batches, names


def _generated(model, batches, options):
    """Per batch b: (batch, result) with the key fold_in(fold_in(key(seed), 0), b)."""
    key = jax.random.fold_in(jax.random.key(options.seed), 0)
    return [
        (batch, generate(*model, batch, rng=jax.random.fold_in(key, b), options=options))
        for b, batch in enumerate(batches)
    ]


def _meta(args, options) -> dict:
    return {"prompts": args.prompts, "options": dataclasses.asdict(options)}


def branching(args) -> list[pathlib.Path]:
    models, _, options, batches, _ = _setup(args, args.model)
    tables = {}
    for spec, model in models.items():
        entropies, lengths = [], []
        for batch, result in _generated(model, batches, options):
            entropies.append(D.token_entropies(*model, batch, result))
            lengths.append(result.lengths)
        tables[spec] = D.branching_factor(np.concatenate(entropies), np.concatenate(lengths))
    out = pathlib.Path(args.out)
    D.write_json(
        {"diagnostic": "branching_factor", **_meta(args, options), "models": tables},
        out / "branching.json",
    )
    D.plot_branching(tables, out / "branching.png")
    return [out / "branching.json", out / "branching.png"]


def shift(args) -> list[pathlib.Path]:
    if not (args.base and args.aligned):
        raise ConfigError("diagnose shift needs --base SPEC and --aligned SPEC")
    models, _, options, batches, _ = _setup(args, [args.base, args.aligned])
    check_vocabularies(
        {
            f"--base {args.base}": models[args.base],
            f"--aligned {args.aligned}": models[args.aligned],
        }
    )
    ranks, lengths = [], []
    for batch, result in _generated(models[args.aligned], batches, options):
        ranks.append(D.token_ranks(*models[args.base], batch, result))
        lengths.append(result.lengths)
    table = D.shift_table(np.concatenate(ranks), np.concatenate(lengths))
    out = pathlib.Path(args.out)
    record = {
        "diagnostic": "token_shift",
        **_meta(args, options),
        "base": args.base,
        "aligned": args.aligned,
        **table,
    }
    D.write_json(record, out / "shift.json")
    D.plot_shift(table, out / "shift.png", title=f"{args.aligned} tokens ranked under {args.base}")
    return [out / "shift.json", out / "shift.png"]


def sweep(args) -> list[pathlib.Path]:
    if len(args.model or []) != 1:
        raise ConfigError("diagnose sweep takes one --model SPEC")
    if not args.reward:
        raise ConfigError("diagnose sweep needs --reward NAME (e.g. demo_judge)")
    reward = get_reward(args.reward)
    models, tokenizer, options, batches, names = _setup(args, args.model)
    settings = D.sweep_grid(args.temperatures, args.top_ps, args.top_ks)
    for s in settings:  # every setting valid before the first sample
        dataclasses.replace(options, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    table = D.decoding_sweep(
        *models[args.model[0]],
        batches,
        reward=reward,
        settings=settings,
        rng=jax.random.key(options.seed),
        options=options,
        tokenizer=tokenizer,
        names=names,
    )
    out = pathlib.Path(args.out)
    record = {
        "diagnostic": "decoding_sweep",
        **_meta(args, options),
        "model": args.model[0],
        "reward": args.reward,
        **table,
    }
    D.write_json(record, out / "sweep.json")
    D.plot_sweep(table, out / "sweep.png")
    return [out / "sweep.json", out / "sweep.png"]


def honesty(args) -> list[pathlib.Path]:
    if not (args.records and args.completions):
        raise ConfigError("diagnose honesty needs --records FILE and --completions FILE")
    patterns = args.abstain_pattern or H.DEFAULT_ABSTAIN_PATTERNS
    records = H.read_honesty_records(args.records)
    completions = H.read_completions(args.completions, records, args.records)
    record = {
        "diagnostic": "honesty",
        "records": args.records,
        "completions": args.completions,
        "abstain_patterns": list(patterns),
        **H.honesty_metrics(records, completions, patterns),
    }
    out = pathlib.Path(args.out)
    D.write_json(record, out)
    return [out]


def run(args: argparse.Namespace) -> list[pathlib.Path]:
    """The `jaxalign diagnose` command; returns the files written."""
    if args.kind in ("branching", "sweep") and not args.model:
        raise ConfigError(f"diagnose {args.kind} needs --model SPEC")
    if args.kind != "honesty" and not args.prompts:
        raise ConfigError(f"diagnose {args.kind} needs --prompts FILE")
    kinds = {"branching": branching, "shift": shift, "sweep": sweep, "honesty": honesty}
    return kinds[args.kind](args)
