"""`jaxalign generate`: completions for a JSONL file of prompts, written as JSONL.

    jaxalign generate --model checkpoint:runs/sft-tiny --prompts data/demo/prompts_eval.jsonl \\
        --out out.jsonl --max_new_tokens 8 --temperature 0
    jaxalign generate --model hf:DIR --prompts FILE --out FILE --template chatml --n 4 --top_p 0.9
    jaxalign generate --model checkpoint:RUN --prompts FILE --out FILE --best_of 8 \\
        --reward demo_judge

- ``--model checkpoint:RUN_DIR`` loads the latest params of a run (or converted checkpoint) and
  its architecture; the tokenizer and template default to the ones the run recorded in its
  checkpoint. ``--model hf:DIR`` loads a Hugging Face directory and its tokenizer files when
  present (template default "plain"). ``--tokenizer`` / ``--template`` override.
- Prompts: ``{"prompt": str | messages, ...}`` records, read by `make_prompt_pipeline` in file
  order (malformed records are named by file and line). A prompt whose length plus
  ``max_new_tokens`` exceeds the model's ``max_seq_len`` is refused, naming the record.
- Output, one line per completion: ``{"prompt", "completion", "finish_reason", "num_tokens",
  "logprob" (sum of the sampling log-probs), "sample", "index" (the prompt's record number from
  0)}``, plus ``"score"`` with ``--best_of``. Written to a temporary file in the output's
  directory and renamed at the end: a failure or Ctrl-C leaves nothing behind.
- ``--best_of N [--worst] --reward NAME`` samples N per prompt, keeps the best (worst) under a
  reward of `REWARD_FUNCTIONS`.
- Generation runs on one device; batch b uses the key ``fold_in(key(seed), b)``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

import jax
import numpy as np
from tqdm import tqdm

from jaxalign import models as M
from jaxalign.checkpoint import load_hf
from jaxalign.checkpoint import manager as ckpt
from jaxalign.checkpoint.convert import model_config_from_dict, read_record
from jaxalign.data import load_tokenizer, make_prompt_pipeline
from jaxalign.errors import ConfigError
from jaxalign.sampling.best_of_n import best_of_n, get_reward
from jaxalign.sampling.engine import check_prompt_lengths, generate
from jaxalign.sampling.options import SamplingOptions

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_model(spec: str) -> tuple[M.ModelConfig, M.Params, str | None, str | None]:
    """``hf:DIR`` or ``checkpoint:RUN_DIR`` -> (config, params on one device, the recorded or
    bundled tokenizer path or None, the recorded template or None)."""
    kind, _, where = spec.partition(":")
    if kind == "hf" and where:
        config, params = load_hf(where)
        has_tokenizer = any((pathlib.Path(where) / f).is_file() for f in _TOKENIZER_FILES)
        return config, params, where if has_tokenizer else None, None
    if kind == "checkpoint" and where:
        record = read_record(where)
        config = model_config_from_dict(record["model_config"])
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
            M.abstract_params(config),
        )
        params = ckpt.load_params(where, abstract)
        template = record.get("data", {}).get("template")
        return config, params, record.get("tokenizer"), template
    raise ConfigError(f"--model {spec!r}: expected hf:DIR or checkpoint:RUN_DIR")


def _tokenizer(path: str | None, config: M.ModelConfig):
    if not path:
        raise ConfigError("no tokenizer recorded with the model: pass --tokenizer PATH")
    try:
        tokenizer = load_tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--tokenizer: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"tokenizer {path} has {tokenizer.vocab_size} tokens but the model only "
            f"{config.vocab_size}"
        )
    return tokenizer


def options_from_args(args: argparse.Namespace, tokenizer) -> SamplingOptions:
    """The sampling options of the command line (EOS and padding from the tokenizer)."""
    if args.best_of and args.n != 1:
        raise ConfigError("--best_of N samples N per prompt itself; leave --n at 1")
    return SamplingOptions(
        max_new_tokens=args.max_new_tokens,
        n=args.best_of or args.n,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        stop_strings=tuple(args.stop or ()),
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    """The `jaxalign generate` command; returns the number of records written."""
    config, params, recorded_tokenizer, recorded_template = load_model(args.model)
    tokenizer = _tokenizer(args.tokenizer or recorded_tokenizer, config)
    template = args.template or recorded_template or "plain"
    options = options_from_args(args, tokenizer)
    reward = None
    if args.best_of:
        if not args.reward:
            raise ConfigError("--best_of needs --reward NAME (e.g. demo_judge)")
        reward = get_reward(args.reward)
    elif args.worst or args.reward:
        raise ConfigError("--worst and --reward go with --best_of N")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size}: expected >= 1")
    pipeline = make_prompt_pipeline(
        args.prompts,
        tokenizer,
        batch_size=args.batch_size,
        max_prompt_len=config.max_seq_len,
        shuffle=False,
        num_epochs=1,
        template=template,
    )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    written = 0
    try:
        with os.fdopen(fd, "w") as f, tqdm(total=pipeline.num_examples, unit="prompt") as bar:
            key = jax.random.key(options.seed)
            for b, batch in enumerate(pipeline):
                start = b * args.batch_size
                names = [f"{args.prompts} record {start + i + 1}" for i in range(args.batch_size)]
                check_prompt_lengths(
                    batch["prompt_lengths"], options.max_new_tokens, config.max_seq_len, names
                )
                rng = jax.random.fold_in(key, b)
                kwargs = dict(rng=rng, options=options, tokenizer=tokenizer)
                if reward is None:
                    result = generate(config, params, batch, **kwargs)
                    sample = np.arange(result.tokens.shape[0]) % options.n
                    score = None
                else:
                    kwargs |= dict(reward=reward, worst=args.worst, names=names)
                    kept = best_of_n(config, params, batch, **kwargs)
                    result, sample, score = kept.result, kept.sample, kept.score
                for r, i in enumerate(result.prompt_index.tolist()):
                    record = batch["records"][i]
                    if record is None:
                        continue
                    n_tokens = int(result.lengths[r])
                    line = {
                        "prompt": record["prompt"],
                        "completion": result.text[r],
                        "finish_reason": result.finish_reason[r],
                        "num_tokens": n_tokens,
                        "logprob": float(result.logprobs[r, :n_tokens].sum()),
                        "sample": int(sample[r]),
                        "index": start + i,
                    }
                    if score is not None:
                        line["score"] = float(score[r])
                    f.write(json.dumps(line) + "\n")
                    written += 1
                bar.update(sum(rec is not None for rec in batch["records"]))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> the usual mode of a new file
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return written
