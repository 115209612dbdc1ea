"""`jaxalign generate`: completions for a JSONL file of prompts, written as JSONL.

    jaxalign generate --model checkpoint:runs/sft-tiny --prompts data/demo/prompts_eval.jsonl \\
        --out out.jsonl --max_new_tokens 8 --temperature 0
    jaxalign generate --model hf:DIR --prompts FILE --out FILE --template chatml --n 4 --top_p 0.9
    jaxalign generate --model checkpoint:RUN --prompts FILE --out FILE --best_of 8 \\
        --reward demo_judge
    jaxalign generate --model checkpoint:RUN --prompts FILE --out FILE --best_of 8 \\
        --reward_model runs/morm-smoke --direction 0.6,0.8
    jaxalign generate --config configs/generate/eft.py[:alpha=2.0] --prompts FILE --out FILE \\
        [--config.models.large_base=hf:DIR] [--temperature 0.7]
    jaxalign generate --config configs/generate/search.py --prompts FILE --out FILE

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
  reward of `REWARD_FUNCTIONS`; ``--reward_model DIR [--direction 0.6,0.8]`` instead, under a
  trained reward model's score (a reward_multi run's: r_v = v . r along the direction,
  normalised to unit length, one number per objective). The run must share the policy's
  tokenizer.
- ``--samples_field NAME``: one line per prompt record instead, the record itself (every field
  kept) with its ``--n`` completion texts as a list under NAME, e.g. D2O's negatives records
  from preference pairs: ``--prompts pairs.jsonl --n 2 --samples_field samples``.
- ``--config CFG`` (instead of ``--model``): guided decoding (`jaxalign.sampling.guided`,
  search-time decoding `jaxalign.sampling.search`) by a
  config built on `guided_config`: the method, its models by role (each distinct spec loaded
  once), its weights, a ``sampling`` section; ``--config.KEY=VALUE`` overrides any key and the
  sampling flags override ``sampling``. Records gain ``"method"``.
- Generation runs on one device; batch b uses the key ``fold_in(key(seed), b)``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import pathlib
import tempfile

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from jaxalign import models as M
from jaxalign.checkpoint import load_hf
from jaxalign.checkpoint.convert import load_model_params, read_model_config, read_record
from jaxalign.config import apply_overrides, load_config
from jaxalign.data import load_tokenizer, make_prompt_pipeline
from jaxalign.errors import ConfigError
from jaxalign.models import heads
from jaxalign.sampling import guided, search
from jaxalign.sampling.best_of_n import RewardModel, best_of_n, get_reward, reward_model
from jaxalign.sampling.engine import check_prompt_lengths, generate
from jaxalign.sampling.options import OPTION_NAMES, SamplingOptions, options_from_dict

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_model(
    spec: str, head: str | None = None
) -> tuple[M.ModelConfig, M.Params, str | None, str | None]:
    """``hf:DIR`` or ``checkpoint:RUN_DIR`` -> (config, params on one device, the recorded or
    bundled tokenizer path or None, the recorded template or None). ``head``: a scalar head the
    run's checkpoint holds besides the decoder ("value_head", "reward_head"), loaded into the
    params under its name (an hf directory holds none)."""
    kind, _, where = spec.partition(":")
    if head is not None and kind == "hf":
        raise ConfigError(f"{spec}: a Hugging Face directory holds no {head}; use checkpoint:RUN")
    if kind == "hf" and where:
        config, params = load_hf(where)
        has_tokenizer = any((pathlib.Path(where) / f).is_file() for f in _TOKENIZER_FILES)
        return config, params, where if has_tokenizer else None, None
    if kind == "checkpoint" and where:
        record = read_record(where)
        head_tree = {head: heads.abstract_scalar_head(read_model_config(where))} if head else None
        config, params = load_model_params(where, heads=head_tree)  # LoRA: merged into its base
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


def guided_config() -> ConfigDict:
    """Every key a guided-decoding config (``configs/generate/*.py``) may set, with its default;
    a config starts from this and sets ``method`` and ``models``."""
    c = ConfigDict()
    c.method = ""  # eft | nudging | genarm (jaxalign.sampling.guided) | search (.search)
    # role -> "checkpoint:RUN_DIR" | "hf:DIR": eft large_base, small_tuned, small_base;
    # nudging base, aligned; genarm base, arms (a tuple of specs); search policy, value (a run
    # whose checkpoint holds `head`).
    c.models = ConfigDict()
    c.alpha = 1.0  # eft: l_large_base + alpha (l_small_tuned - l_small_base); search: l + alpha V
    c.gamma = 0.4  # nudging: the aligned model emits a token where base top-1 p < gamma
    c.beta = 1.0  # genarm: l_base + (1 / beta) sum_i w_i l_arm_i
    c.weights = ()  # genarm: w_i, one per arm (empty: 1 each)
    c.k = 4  # search: the policy's top-k tokens scored per step
    c.head = "value_head"  # search: the value model's head (value_head: PPO; reward_head: RM)
    c.tokenizer = ""  # default: the one recorded with the first model
    c.template = ""  # default: the first model's recorded template, else plain
    # SamplingOptions fields (None: its default; EOS and padding come from the tokenizer); the
    # command-line flags override them.
    c.sampling = ConfigDict({k: None for k in OPTION_NAMES if k not in ("eos_id", "pad_id")})
    return c


def _check_guided_config(config: ConfigDict, source: str) -> None:
    """Unknown keys, an unknown method and missing or unknown model roles, named."""
    known = guided_config()
    for key in config.keys():
        if key not in known:
            close = difflib.get_close_matches(key, list(known.keys()), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ConfigError(f'{source}: unknown key "{key}"{hint}')
    if config.method not in guided.ROLES:
        raise ConfigError(
            f"{source}: unknown guided method {config.method!r} (known: "
            f"{', '.join(sorted(guided.ROLES))})"
        )
    roles = guided.ROLES[config.method]
    for role in config.models.keys():
        if role not in roles:
            raise ConfigError(
                f"{source}: method {config.method} has no model role {role!r} (its roles: "
                f"{', '.join(roles)})"
            )
    for role in roles:
        if not config.models.get(role):
            raise ConfigError(
                f"{source}: method {config.method} needs models.{role} (checkpoint:RUN_DIR or "
                f"hf:DIR; e.g. --config.models.{role}=checkpoint:runs/demo/sft)"
            )


def options_from_args(
    args: argparse.Namespace, tokenizer, config_sampling: dict | None = None
) -> SamplingOptions:
    """The sampling options: the config's ``sampling`` (guided configs) under the flags given on
    the command line; EOS and padding from the tokenizer."""
    best_of = getattr(args, "best_of", 0)  # `jaxalign diagnose` has no --best_of
    if best_of and args.n not in (None, 1):
        raise ConfigError("--best_of N samples N per prompt itself; leave --n at 1")
    flags = {name: getattr(args, name) for name in _OPTION_FLAGS}
    flags["stop_strings"] = tuple(args.stop) if args.stop else None
    flags["n"] = best_of or args.n
    values = {k: v for k, v in (config_sampling or {}).items() if v is not None}
    values |= {k: v for k, v in flags.items() if v is not None}
    return options_from_dict(values | {"eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id})


_OPTION_FLAGS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "seed",
)


def _guided_sampler(args, overrides):
    """Models, tokenizer, template, options and the per-batch sampling function of a guided
    config (`guided_config`)."""
    source = args.config.partition(":")[0]
    config = apply_overrides(load_config(args.config), overrides, source=source)
    _check_guided_config(config, source)
    if args.model or args.best_of or args.reward or args.reward_model or args.worst:
        raise ConfigError(
            f"{source} names its models (override one with --config.models.ROLE=SPEC); "
            "--model, --best_of, --reward, --reward_model and --worst go without --config"
        )
    if config.method == "eft":
        guided.eft_state(config.alpha)
    elif config.method == "nudging":
        guided.nudging_state(config.gamma)
    roles = guided.ROLES[config.method]
    # role -> its specs (a list: genarm's arms are several) -> loaded once per distinct spec
    # (search's value model with its head: a spec of its own)
    specs = {
        role: list(spec) if isinstance(spec, tuple | list) else [spec]
        for role, spec in ((r, config.models[r]) for r in roles)
    }
    if config.method == "search":
        if config.head not in search.HEADS:
            raise ConfigError(f"{source}: head={config.head!r}: expected one of {search.HEADS}")
        specs["value"] = [(specs["value"][0], config.head)]
    cache = {spec: None for role in roles for spec in specs[role]}
    for spec in cache:
        cache[spec] = load_model(*spec) if isinstance(spec, tuple) else load_model(spec)
    if config.method == "genarm":
        guided.genarm_state(config.beta, tuple(config.weights) or None, len(specs["arms"]))
    guided.check_vocabularies(
        {f"{role} ({spec})": cache[spec][:2] for role in roles for spec in specs[role]}
    )
    models = {role: [cache[spec][:2] for spec in specs[role]] for role in roles}
    first = cache[specs[roles[0]][0]]
    tokenizer = _tokenizer(args.tokenizer or config.tokenizer or first[2], first[0])
    template = args.template or config.template or first[3] or "plain"
    options = options_from_args(args, tokenizer, config.sampling.to_dict())
    max_seq_len = min(m[0].max_seq_len for m in cache.values())

    def sample(batch, rng, names):
        kw = dict(rng=rng, options=options, tokenizer=tokenizer)
        if config.method == "eft":
            large_base, small_tuned, small_base = (models[r][0] for r in roles)
            result = guided.eft(
                large_base, small_tuned, small_base, batch, alpha=config.alpha, **kw
            )
        elif config.method == "nudging":
            base, aligned = (models[r][0] for r in roles)
            result = guided.nudging(base, aligned, batch, gamma=config.gamma, **kw)
        elif config.method == "search":
            policy, value = (models[r][0] for r in roles)
            result = search.search(
                policy, value, batch, alpha=config.alpha, k=config.k, head=config.head, **kw
            )
        else:
            weights = tuple(config.weights) or None
            result = guided.genarm(
                models["base"][0], models["arms"], batch, beta=config.beta, weights=weights, **kw
            )
        return result, np.arange(result.tokens.shape[0]) % options.n, None

    return tokenizer, template, options, max_seq_len, sample, {"method": config.method}


def _single_sampler(args):
    """Model, tokenizer, template, options and the per-batch sampling function of ``--model``
    (with ``--best_of``: best-of-N)."""
    if not args.model:
        raise ConfigError("generate needs --model hf:DIR|checkpoint:RUN_DIR or --config CFG")
    config, params, recorded_tokenizer, recorded_template = load_model(args.model)
    tokenizer = _tokenizer(args.tokenizer or recorded_tokenizer, config)
    template = args.template or recorded_template or "plain"
    options = options_from_args(args, tokenizer)
    reward = None
    if args.direction and not args.reward_model:
        raise ConfigError("--direction goes with --reward_model DIR")
    if args.best_of:
        if bool(args.reward) == bool(args.reward_model):
            raise ConfigError(
                "--best_of needs one of --reward NAME (e.g. demo_judge) and --reward_model DIR"
            )
        if args.reward:
            reward = get_reward(args.reward)
        else:
            reward = _reward_model(args, tokenizer)
    elif args.worst or args.reward or args.reward_model:
        raise ConfigError("--worst, --reward and --reward_model go with --best_of N")

    def sample(batch, rng, names):
        kw = dict(rng=rng, options=options, tokenizer=tokenizer)
        if reward is None:
            result = generate(config, params, batch, **kw)
            return result, np.arange(result.tokens.shape[0]) % options.n, None
        kept = best_of_n(config, params, batch, reward=reward, worst=args.worst, names=names, **kw)
        return kept.result, kept.sample, kept.score

    return tokenizer, template, options, config.max_seq_len, sample, {}


def _reward_model(args, tokenizer) -> RewardModel:
    """``--reward_model DIR`` (a reward or reward_multi run) with ``--direction v1,v2,...``; the
    run must have been trained with the policy's tokenizer."""
    from jaxalign.train.reward import load_reward_model

    recorded = read_record(args.reward_model).get("tokenizer")
    if recorded and pathlib.Path(recorded).resolve() != pathlib.Path(tokenizer.path).resolve():
        raise ConfigError(
            f"--reward_model {args.reward_model} was trained with tokenizer {recorded}, the "
            f"policy uses {tokenizer.path}: it would score other tokens"
        )
    direction = None
    if args.direction:
        try:
            direction = [float(x) for x in args.direction.split(",")]
        except ValueError:
            raise ConfigError(
                f"--direction {args.direction!r}: expected comma-separated numbers, e.g. 0.6,0.8"
            ) from None
    config, params = load_reward_model(args.reward_model)
    return reward_model(config, params, direction, name=f"--reward_model {args.reward_model}")


def run(args: argparse.Namespace, overrides: list[str] = ()) -> int:
    """The `jaxalign generate` command; returns the number of records written."""
    if args.config:
        tokenizer, template, options, max_seq_len, sample, extra = _guided_sampler(
            args, list(overrides)
        )
    else:
        tokenizer, template, options, max_seq_len, sample, extra = _single_sampler(args)
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size}: expected >= 1")
    if args.samples_field and args.best_of:
        raise ConfigError("--samples_field writes all --n samples; it goes without --best_of")
    pipeline = make_prompt_pipeline(
        args.prompts,
        tokenizer,
        batch_size=args.batch_size,
        max_prompt_len=max_seq_len,
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
                    batch["prompt_lengths"], options.max_new_tokens, max_seq_len, names
                )
                result, sample_index, score = sample(batch, jax.random.fold_in(key, b), names)
                if args.samples_field:
                    texts = {}
                    for r, i in enumerate(result.prompt_index.tolist()):
                        texts.setdefault(i, []).append(result.text[r])
                    for i, record in enumerate(batch["records"]):
                        if record is not None:
                            f.write(json.dumps(record | {args.samples_field: texts[i]}) + "\n")
                            written += 1
                    bar.update(sum(rec is not None for rec in batch["records"]))
                    continue
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
                        "sample": int(sample_index[r]),
                        "index": start + i,
                    } | extra
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
