"""`jaxalign data inspect`: what a data file holds, and how a run's config would read it.

    jaxalign data inspect data/demo/pairs_train.jsonl --config configs/dpo/tiny.py --show 2
    jaxalign data inspect data/train.parquet --config configs/dpo/tiny.py \\
        --config.data.max_len=1024 --out lengths.png

FILE is anything `jaxalign.data.sources.open_source` reads; the config gives the record format
(its trainer family's: pairs, SFT, unpaired, or prompts for online RL), the numeric
``data.extra_fields``, the tokenizer, the template and the lengths. The report:

- records: the valid ones, and the malformed ones (the first few named by file and line or row),
  which the run skips with ``data.skip_bad_records=True`` and otherwise stops at;
- token lengths of the prompts (BOS and template included; once per example) and of the
  responses (template end and EOS included; chosen and rejected both count), untruncated: min,
  median, p90, p99, max and a text histogram; ``--out FILE.png`` draws prompts, responses and
  whole sequences, with the config's limits;
- truncation under ``data.max_prompt_len`` and ``data.max_len`` (the policy of
  `jaxalign.data.formats`): prompts cut from the left, responses cut from the right, examples
  with any cut (the run's ``data/truncated_examples`` over one epoch); for prompt records only
  ``data.max_prompt_len``, beside the completions' ``rl.max_new_tokens`` and ``rl.group_size``;
- the first ``--show N`` records rendered as the run tokenises them: tokens without loss in
  ``[brackets]`` (the prompt), tokens with loss plain (the response), special tokens by name,
  newlines as ``\\n``.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from ml_collections import ConfigDict

from jaxalign.data import formats
from jaxalign.data.sources import open_source
from jaxalign.data.templates import get_template
from jaxalign.data.tokenizers import load_tokenizer
from jaxalign.errors import ConfigError
from jaxalign.plot import save_figure

_UNBOUNDED = 1 << 30
_BAR = 40


@dataclasses.dataclass
class Inspection:
    """What `inspect_data` found (lengths in tokens, untruncated).

    Attributes:
      path: the data path.
      records: the record format read ("pair", "sft", "unpaired", "prompt").
      num_examples: valid examples E.
      num_bad: malformed records (skipped here).
      bad_messages: the first few malformed records' messages.
      prompt_lengths: int [E] prompt tokens of each example.
      response_lengths: int [S] response tokens of each sequence (S = E x responses per example).
      sequence_lengths: int [S] prompt + response tokens of each sequence.
      prompts_cut: examples whose prompt is longer than max_prompt_len.
      responses_cut: sequences whose response does not fit max_len after the (cut) prompt.
      examples_cut: examples with any cut.
      shown: the first records rendered with their loss mask.
    """

    path: str
    records: str
    num_examples: int
    num_bad: int
    bad_messages: list[str]
    prompt_lengths: np.ndarray
    response_lengths: np.ndarray
    sequence_lengths: np.ndarray
    prompts_cut: int
    responses_cut: int
    examples_cut: int
    shown: list[str]


def records_format(config: ConfigDict) -> str:
    """The record format the config's trainer reads: its objective's batch spec for the offline
    families (the architecture comes from `model.preset`; no file is read), prompts for online."""
    from jaxalign.config import check_known_keys
    from jaxalign.train import families
    from jaxalign.train.run import model_config_from

    check_known_keys(config)
    family = families.get(config.trainer)
    if family.loop != "offline":
        return "prompt"
    preset_only = ConfigDict(config.to_dict())
    preset_only.model.init_from = ""
    return family.objective(config, model_config_from(preset_only), None).batch.records


def _parser(records: str, extra_fields: tuple[str, ...]):
    if records == "pair":
        return functools.partial(formats.parse_pair, extra_fields=extra_fields)
    if records == "unpaired":
        return functools.partial(formats.parse_unpaired, extra_fields=extra_fields)
    return formats.parse_sft if records == "sft" else formats.parse_prompt


def inspect_data(path: str, config: ConfigDict, *, show: int = 3) -> Inspection:
    """Read every record of `path` as the config's run would and measure it (module doc)."""
    records = records_format(config)
    data = config.data
    if records != "prompt":
        formats.check_lengths(data.max_len, data.max_prompt_len)
    elif data.max_prompt_len < 1:
        raise ConfigError(f"data.max_prompt_len={data.max_prompt_len}: expected >= 1")
    try:
        tokenizer = load_tokenizer(config.tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer {config.tokenizer}: {e}") from None
    template = get_template(data.template, tokenizer)
    parse = _parser(records, tuple(data.extra_fields))
    source = open_source(path, parse, skip_bad_records=True)
    prompts, responses, sequences, shown = [], [], [], []
    prompts_cut = responses_cut = examples_cut = 0
    for index in range(len(source)):
        example = source[index]
        messages, system = example["messages"], example["system"]
        if records == "prompt":
            ids = formats.encode_prompt(
                tokenizer, template, messages, system, max_prompt_len=_UNBOUNDED
            )
            prompts.append(len(ids))
            prompt_cut = len(ids) > data.max_prompt_len
            prompts_cut += prompt_cut
            examples_cut += prompt_cut
            if index < show:
                kept = formats.encode_prompt(
                    tokenizer, template, messages, system, max_prompt_len=data.max_prompt_len
                )
                head = f"  prompt: {len(kept)} tokens" + (", truncated" if prompt_cut else "")
                shown.append(f"example {index}:\n{head}\n{_render(tokenizer, kept)}")
            continue
        cut_any = False
        lines = []
        for k, response in enumerate(example["responses"]):
            full, plen, _ = formats.tokenize_example(
                tokenizer,
                template,
                messages,
                system,
                response,
                max_len=_UNBOUNDED,
                max_prompt_len=_UNBOUNDED - 1,
            )
            # the truncation policy of jaxalign.data.formats, from the untruncated lengths
            kept_prompt = min(plen, data.max_prompt_len)
            response_cut = kept_prompt + len(full) - plen > data.max_len + 1
            if k == 0:
                prompts.append(plen)
                prompt_cut = plen > data.max_prompt_len
                prompts_cut += prompt_cut
                cut_any |= prompt_cut
            responses.append(len(full) - plen)
            sequences.append(len(full))
            responses_cut += response_cut
            cut_any |= response_cut
            if index < show:
                lines.append(
                    _render_sequence(
                        tokenizer, template, example, response, _name(records, k), config
                    )
                )
        examples_cut += cut_any
        if index < show:
            shown.append(f"example {index}:\n" + "\n".join(lines))
    return Inspection(
        path=str(path),
        records=records,
        num_examples=len(source),
        num_bad=source.num_bad_records,
        bad_messages=list(source.bad_record_messages),
        prompt_lengths=np.asarray(prompts, np.int64),
        response_lengths=np.asarray(responses, np.int64),
        sequence_lengths=np.asarray(sequences, np.int64),
        prompts_cut=int(prompts_cut),
        responses_cut=int(responses_cut),
        examples_cut=int(examples_cut),
        shown=shown,
    )


def _name(records: str, k: int) -> str:
    return ("chosen", "rejected")[k] if records == "pair" else "response"


def _render_sequence(tokenizer, template, example, response, name, config) -> str:
    """One sequence as the run builds it: ids truncated by the config, loss mask shown."""
    data = config.data
    ids, plen, truncated = formats.tokenize_example(
        tokenizer,
        template,
        example["messages"],
        example["system"],
        response,
        max_len=data.max_len,
        max_prompt_len=data.max_prompt_len,
    )
    ids = ids.tolist()
    first_loss = 1 if data.train_on_prompt else plen  # token j has loss iff j >= first_loss
    with_loss = len(ids) - max(first_loss, 1)
    note = ", truncated" if truncated else ""
    head = f"  {name}: {len(ids)} tokens, {plen} prompt + {len(ids) - plen} response"
    head += f", {with_loss} with loss{note}"
    return head + "\n" + _render(tokenizer, ids, first_loss)


def _render(tokenizer, ids: list[int], first_loss: int | None = None) -> str:
    """Text of `ids`: tokens without loss (before `first_loss`, the first token always) in
    [brackets], special tokens by their vocabulary name, newlines as \\n."""
    first_loss = len(ids) if first_loss is None else max(first_loss, 1)
    pieces, run = [], []

    def flush():
        if run:
            pieces.append(tokenizer.decode(run))
            run.clear()

    for j, token in enumerate(ids):
        if j == first_loss:
            flush()
            pieces.append("]")
        if j == 0:
            pieces.append("[")
        if tokenizer.is_special(token):
            flush()
            pieces.append(tokenizer.piece(token))
        else:
            run.append(token)
    flush()
    if first_loss >= len(ids):
        pieces.append("]")
    return "    " + "".join(pieces).replace("\n", "\\n")


def _stats(lengths: np.ndarray) -> str:
    if not len(lengths):
        return "none"
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return f"min {lengths.min()}, median {p50:g}, p90 {p90:g}, p99 {p99:g}, max {lengths.max()}"


def _edges(lengths: np.ndarray, bins: int) -> np.ndarray:
    """At most `bins` equal-width bins of whole token counts: [edges[i], edges[i + 1])."""
    lo, hi = int(lengths.min()), int(lengths.max())
    width = max(1, -(-(hi - lo + 1) // bins))
    return np.arange(lo, hi + width + 1, width)


def histogram(lengths: np.ndarray, bins: int = 10) -> list[str]:
    """Text histogram: one line per bin ``lo-hi | ##### | count``, equal-width integer bins."""
    if not len(lengths):
        return []
    hi = int(lengths.max())
    edges = _edges(lengths, bins)
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(int(counts.max()), 1)
    digits = len(str(hi))
    return [
        f"  {a:>{digits}}-{b - 1:<{digits}} |{'#' * round(_BAR * c / top):<{_BAR}}| {c}"
        for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)
    ]


def report(ins: Inspection, config: ConfigDict) -> str:
    """The inspection as text (module doc)."""
    data = config.data
    lines = [
        f"{ins.path}: {ins.num_examples} examples ({ins.records} records), "
        f"template {data.template}, tokenizer {config.tokenizer}"
    ]
    if ins.num_bad:
        then = (
            "skipped (data.skip_bad_records=True)"
            if data.skip_bad_records
            else "the run stops at the first (data.skip_bad_records=False)"
        )
        lines.append(f"malformed records: {ins.num_bad}, {then}:")
        lines += [f"  {m}" for m in ins.bad_messages]
    else:
        lines.append("malformed records: 0")
    lines.append(f"prompt tokens ({len(ins.prompt_lengths)}): {_stats(ins.prompt_lengths)}")
    lines += histogram(ins.prompt_lengths)
    if ins.records != "prompt":
        lines.append(
            f"response tokens ({len(ins.response_lengths)}): {_stats(ins.response_lengths)}"
        )
        lines += histogram(ins.response_lengths)
    n = max(ins.num_examples, 1)
    limits = f"data.max_prompt_len={data.max_prompt_len}"
    if ins.records != "prompt":
        limits += f", data.max_len={data.max_len}"
    lines.append(f"truncation ({limits}):")
    lines.append(f"  prompts cut from the left: {ins.prompts_cut} of {ins.num_examples} examples")
    if ins.records == "prompt":
        rl = config.rl
        lines.append(
            f"  completions: sampled in training, at most rl.max_new_tokens={rl.max_new_tokens} "
            f"tokens, rl.group_size={rl.group_size} per prompt"
        )
    else:
        lines.append(
            f"  responses cut from the right: {ins.responses_cut} of "
            f"{len(ins.response_lengths)} sequences"
        )
    lines.append(
        f"  examples truncated: {ins.examples_cut} of {ins.num_examples} "
        f"({100 * ins.examples_cut / n:.1f}%)"
    )
    if ins.shown:
        lines.append("first examples ([...] = no loss):")
        lines += ins.shown
    return "\n".join(lines)


def plot_lengths(ins: Inspection, config: ConfigDict, out: str) -> None:
    """Histograms of prompt, response and sequence lengths with the config's limits, as a PNG (or
    any format matplotlib writes, by `out`'s suffix); written to a temporary file and renamed."""
    data = config.data
    panels = [("prompt tokens", ins.prompt_lengths, data.max_prompt_len, "max_prompt_len")]
    if ins.records != "prompt":
        panels.append(("response tokens", ins.response_lengths, None, ""))
        panels.append(("sequence tokens", ins.sequence_lengths, data.max_len + 1, "max_len + 1"))
    fig = Figure(figsize=(4.5 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, lengths, limit, label) in zip(axes[0], panels, strict=True):
        if len(lengths):
            ax.hist(lengths, bins=_edges(lengths, 50) - 0.5, color="tab:blue")
        if limit is not None:
            ax.axvline(limit, color="tab:red", linestyle="--", label=f"{label} = {limit}")
            ax.legend(fontsize=8)
        ax.set_title(f"{title} ({len(lengths)})")
        ax.set_xlabel("tokens")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax = axes[0][0]
    ax.set_ylabel("count")
    fig.suptitle(os.path.basename(ins.path.rstrip("/")) or ins.path, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out)
