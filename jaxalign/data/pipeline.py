"""Grain pipelines that turn record files into fixed-shape training batches.

Pipeline (DESIGN.md decision 6): `open_source` (validated records from JSONL, Parquet, Arrow /
``datasets``, ArrayRecord or a set of shards; `jaxalign.data.sources`) -> per-host slice
``[process_index::process_count]`` -> ``shuffle(seed)`` (a fresh permutation every epoch) ->
``repeat(num_epochs)`` -> ``map(tokenise + template + truncate)`` (all `grain.MapDataset`) ->
`BatchIterator` (pad to a length bucket, or first-fit packing) -> batch dict of NumPy arrays.

Batch layout: `jaxalign.data.layout` (every key, its dimensions and dtype). Sequences:

- SFT / unpaired: B = E = batch_size; sequence i is example i.
- Pairs: P = batch_size pairs, B = 2P; sequence i is the chosen response of pair i and sequence P +
  i the rejected one. A sequence's log-prob is ``segment_sum(token_logps * loss_mask, seq_index,
  B)``.
- Negatives (D2O, `make_negatives_pipeline`): E = batch_size records of K = num_samples samples,
  B = (1 + K) E; sequence i is the rejected response of example i, sequence (1 + k) E + i its
  sample k.
- Ranked (AFT, `make_ranked_pipeline`): E = batch_size records of P = num_correct correct and N =
  num_incorrect incorrect responses, B = (P + N) E; sequence k E + i is response k of example i
  (k < P its correct response k, else its incorrect response k - P).
- Unpaired with ``kl_sequences=True`` (KTO's KL baseline): B = 2E; sequence E + i is example i's
  prompt followed by the completion of the *next* example of the data order (the previous one for
  the last example of finite data), cut to max_len like any sequence: the mismatched pairs
  (x_i, y_j) whose log-ratios estimate KL (Ethayarajh et al., 2024; TRL shifts completions within
  a batch the same way). It depends only on the example's index, so resumption stays exact.
- Judgments (CUT, `make_judgment_pipeline`): B = 2E; sequence i is example i's response after
  its prompt, sequence E + i the same response after the prompt with the judgment appended. Both
  hold the same response tokens (the longer is cut to the shorter's length).
- Contrast pairs (Re-Align, `make_contrast_pipeline`): B = 3P; sequences i and P + i as for pairs,
  sequence 2P + i the chosen response of pair i after its ``contrast_prompt``.
- ``train_on_prompt=True``: loss_mask also covers the prompt tokens (every target but the first
  token), e.g. the joint preference objective (DOVE / JPO ``joint=True``) where logp counts the
  prompt.

Shapes. Pad mode (``pack=False``): one sequence per row, row r = sequence r (R = B), and T = the
smallest length bucket >= the longest sequence of the batch (``length_buckets``, default powers of
two from 16 plus ``max_len``), so jit compiles once per bucket. Pack mode (``pack=True``): R =
``pack_rows`` rows of T = ``max_len``, always the same shape; examples are taken in order and each
sequence goes into the first row with room (first-fit); the batch ends when the next example does
not fit or all B slots are used, and that example starts the next batch (nothing is dropped; empty
slots have example_mask 0). A pair is placed only if both its sequences fit.

Determinism and resumption. The order depends only on (seed, data, process_index, process_count),
and a batch only on the index of its first example, so ``state = it.get_state()`` is
``{"next_index": int, "fingerprint": {...}}`` (JSON-serialisable) and a fresh iterator given
``it.set_state(state)`` yields exactly the batches the old one would have. ``set_state`` refuses a
state whose fingerprint (data size, seed, batch shape options, host slice) differs.

Multi-host. ``batch_size`` is per host; each host reads a disjoint slice of the records, and the
slices cover the data. Hosts must produce the same shapes: use ``pack=True`` (fixed shape), or pad
mode, which uses T = max_len when process_count > 1 unless ``length_buckets`` is given. Slices
differ in length by at most one record and packed batches consume varying numbers of examples, so
multi-host training should run for a number of steps over ``num_epochs=None`` (endless) data.

Also here: `make_prompt_pipeline` (left-padded prompt batches for generation, `PromptIterator`) and
`Prefetch` (builds batches ahead on a thread; its state stays that of the last returned batch).
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Sequence

import grain
import numpy as np

from jaxalign.data import formats, layout
from jaxalign.data.errors import DataError
from jaxalign.data.sources import RecordTransform, Source, open_source
from jaxalign.data.templates import Template, get_template
from jaxalign.data.tokenizers import Tokenizer, load_tokenizer

_KINDS = ("sft", "pair", "unpaired", "negatives", "ratings", "judgment", "contrast", "ranked")


def sequences_per_example(
    kind: str, kl_sequences: bool, num_samples: int, num_ranked: int = 0
) -> int:
    """2 for pairs, judgments and KTO's KL sequences, 3 for contrast pairs, 1 + K for negatives
    records, P + N (`num_ranked`) for ranked records, else 1."""
    if kind == "negatives":
        return 1 + num_samples
    if kind == "ranked":
        return num_ranked
    if kind == "contrast":
        return 3
    return 2 if kind in ("pair", "judgment") or kl_sequences else 1


def default_length_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` below `max_len`, then `max_len`."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return (*out, max_len)


def _parse_and_render(rec: dict, *, parse, template: Template) -> dict:
    """`parse`, then render the example with a chat template that may refuse it (the tokenizer's
    Jinja template: ``raise_exception``), so that such a record fails when the source validates
    it, naming its file and line, not when its batch is built."""
    example = parse(rec)
    for response in example.get("responses", ()):
        template.render_response(response, example["messages"], example["system"])
    if "responses" not in example:
        template.render_prompt(example["messages"], example["system"])
    return example


def _checked(parse, template: Template):
    if not template.chat_template:
        return parse
    return functools.partial(_parse_and_render, parse=parse, template=template)


def _tokenize(
    example: dict,
    *,
    tokenizer,
    template: Template,
    max_len: int,
    max_prompt_len: int,
    add_bos: bool,
) -> dict:
    """Normalised example -> {"seqs": [(ids, prompt_len), ...], "truncated": bool, **scalar
    fields}. Response k follows ``example["prompts"][k]`` when the example has one prefix per
    response; with ``same_response`` every sequence keeps the same response tokens (cut to the
    shortest, which truncation may have shortened)."""
    seqs, truncated = [], False
    responses = example["responses"]
    prompts = example.get("prompts") or [example["messages"]] * len(responses)
    for messages, r in zip(prompts, responses, strict=True):
        ids, prompt_len, cut = formats.tokenize_example(
            tokenizer,
            template,
            messages,
            example["system"],
            r,
            max_len=max_len,
            max_prompt_len=max_prompt_len,
            add_bos=add_bos,
        )
        seqs.append((ids, prompt_len))
        truncated |= cut
    if example.get("same_response"):
        seqs = _same_response(seqs, example)
    own = ("messages", "system", "responses", "prompts", "same_response")
    out = {k: v for k, v in example.items() if k not in own}
    return out | {"seqs": seqs, "truncated": truncated}


def _same_response(seqs: list, example: dict) -> list:
    """The sequences cut to their shortest response, which must be the same tokens in each."""
    tails = [ids[plen:] for ids, plen in seqs]
    n = min(len(t) for t in tails)
    if any(not np.array_equal(t[:n], tails[0][:n]) for t in tails):
        raise DataError(
            f"the response {example['responses'][0][:40]!r} tokenises differently after its "
            "prompts (the template joins prompt and response tokens); a judgment record needs "
            "the same response tokens after the prompt with and without the judgment"
        )
    return [(ids[: plen + n], plen) for ids, plen in seqs]


class _ResumableIterator:
    """Walks a `grain.MapDataset` by index; its position is the whole (JSON-serialisable) state."""

    def __init__(self, dataset: grain.MapDataset, source: Source, fingerprint: dict):
        self._ds = dataset
        self._len = len(dataset)
        self._next = 0
        self.source = source
        self.fingerprint = fingerprint

    @property
    def num_bad_records(self) -> int:
        """Malformed records skipped (``skip_bad_records=True``)."""
        return self.source.num_bad_records

    def __iter__(self):
        return self

    def get_state(self) -> dict:
        """JSON-serialisable position: ``{"next_index": int, "fingerprint": dict}``."""
        return {"next_index": int(self._next), "fingerprint": dict(self.fingerprint)}

    def set_state(self, state: dict) -> None:
        """Continue from `get_state()` of an iterator built with the same data and options."""
        saved = state.get("fingerprint", {})
        diff = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
        if diff:
            raise ValueError(
                f"data iterator state does not match this pipeline (saved, now): {diff}"
            )
        self._next = int(state["next_index"])


def _first_fit(seqs: list, slots: list[int], fill: list[int], T: int):
    """Put each sequence in the first row with room; (placements, new fill) or None if one misses.

    Placements are (slot, row, offset, ids, prompt_len); a sequence of n + 1 ids takes n columns.
    """
    fill = list(fill)
    placed = []
    for slot, (ids, plen) in zip(slots, seqs, strict=True):
        n = len(ids) - 1
        row = next((r for r, used in enumerate(fill) if used + n <= T), None)
        if row is None:
            return None
        placed.append((slot, row, fill[row], ids, plen))
        fill[row] += n
    return placed, fill


class BatchIterator(_ResumableIterator):
    """Iterator of fixed-shape batch dicts (layout in the module doc) with checkpointable state.

    Attributes:
      source: the record source (``source.num_bad_records`` counts skipped records).
      num_examples: examples this host sees per epoch.
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        source: Source,
        *,
        kind: str,
        batch_size: int,
        max_len: int,
        pack: bool,
        pack_rows: int | None,
        length_buckets: Sequence[int],
        pad_id: int,
        extra_fields: Sequence[str],
        num_examples: int,
        fingerprint: dict,
        kl_sequences: bool = False,
        train_on_prompt: bool = False,
        num_samples: int = 0,
        num_ranked: int = 0,
    ):
        super().__init__(dataset, source, fingerprint)
        self.kind = kind
        self.kl_sequences = kl_sequences
        self.train_on_prompt = train_on_prompt
        self.batch_size = batch_size
        self.max_len = max_len
        self.pack = pack
        self.pack_rows = pack_rows
        self.length_buckets = tuple(sorted(length_buckets))
        self.pad_id = pad_id
        self.extra_fields = tuple(extra_fields)
        self.num_examples = num_examples
        # Examples whose prompt or response was cut to max_prompt_len / max_len, counted as
        # batches are built (this iterator's lifetime, not saved).
        self.num_truncated = 0
        self._seqs_per_example = sequences_per_example(kind, kl_sequences, num_samples, num_ranked)
        self.num_sequences = batch_size * self._seqs_per_example

    def _slots(self, j: int) -> list[int]:
        """Sequence slots of the j-th example of a batch."""
        return [j + k * self.batch_size for k in range(self._seqs_per_example)]

    def _example(self, index: int) -> dict:
        """Example `index`, with its mismatched KL sequence appended when asked for."""
        ex = self._ds[index]
        if not self.kl_sequences:
            return ex
        other = index + 1 if index + 1 < self._len else index - 1
        ids, plen = ex["seqs"][0]
        other_ids, other_plen = self._ds[max(other, 0)]["seqs"][0]
        mismatched = np.concatenate([ids[:plen], other_ids[other_plen:]])[: self.max_len + 1]
        return ex | {"seqs": [ex["seqs"][0], (mismatched, plen)]}

    def __next__(self) -> dict[str, np.ndarray]:
        if self._next >= self._len:
            raise StopIteration
        examples, placed = [], []  # placed: (slot, row, offset, ids, prompt_len)
        if self.pack:
            rows, T = self.pack_rows, self.max_len
            fill = [0] * rows
            while len(examples) < self.batch_size and self._next + len(examples) < self._len:
                ex = self._example(self._next + len(examples))
                fit = _first_fit(ex["seqs"], self._slots(len(examples)), fill, T)
                if fit is None:  # this example opens the next batch
                    break
                trial, fill = fit
                examples.append(ex)
                placed.extend(trial)
        else:
            n_ex = min(self.batch_size, self._len - self._next)
            examples = [self._example(self._next + j) for j in range(n_ex)]
            for j, ex in enumerate(examples):
                for slot, (ids, plen) in zip(self._slots(j), ex["seqs"], strict=True):
                    placed.append((slot, slot, 0, ids, plen))
            rows = self.num_sequences
            longest = max(len(p[3]) - 1 for p in placed)
            T = next(b for b in self.length_buckets if b >= longest)
        self._next += len(examples)
        self.num_truncated += sum(ex["truncated"] for ex in examples)
        return self._assemble(examples, placed, rows, T)

    def _assemble(
        self, examples: list[dict], placed: list, R: int, T: int
    ) -> dict[str, np.ndarray]:
        batch = layout.row_arrays(R, T, self.pad_id)
        n_segments = np.zeros(R, np.int32)
        for slot, row, off, ids, plen in placed:
            n = len(ids) - 1
            s = slice(off, off + n)
            batch["tokens"][row, s] = ids[:-1]
            batch["targets"][row, s] = ids[1:]
            # target k is ids[k + 1]: a response token iff k + 1 >= prompt_len
            batch["loss_mask"][row, s] = np.arange(n) >= (0 if self.train_on_prompt else plen - 1)
            batch["positions"][row, s] = np.arange(n)
            n_segments[row] += 1
            batch["segment_ids"][row, s] = n_segments[row]
            batch["seq_index"][row, s] = slot
        # Record fields -> batch keys: every example is real (example_mask 1), unpaired records'
        # "label" becomes `labels`, extra fields keep their names.
        fields = {layout.EXAMPLE_MASK: None}
        if self.kind == "unpaired":
            fields[layout.LABELS] = "label"
        if self.kind == "ratings":
            fields[layout.RATINGS] = "ratings"
        fields |= {f: f for f in self.extra_fields}
        values = [[1.0 if f is None else ex[f] for f in fields.values()] for ex in examples]
        return batch | layout.example_arrays(values, tuple(fields), self.batch_size)


def _index_dataset(
    source: Source,
    fn,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    process_index: int,
    process_count: int,
) -> tuple[grain.MapDataset, int]:
    """source -> host slice -> shuffle (new permutation per epoch) -> repeat -> map(fn)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    ds = grain.MapDataset.source(source)[process_index::process_count]
    num_examples = len(ds)
    if num_examples == 0:
        raise DataError(
            f"{source.path}: {len(source)} records leave none for process {process_index} of "
            f"{process_count} (each process reads its own slice)"
        )
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs).map(fn), num_examples


def _make_pipeline(
    kind: str,
    parse,
    path: str,
    tokenizer: Tokenizer | str,
    *,
    batch_size: int,
    max_len: int,
    max_prompt_len: int | None,
    pack: bool,
    pack_rows: int | None,
    length_buckets: Sequence[int] | None,
    seed: int,
    shuffle: bool,
    template: str | Template,
    add_bos: bool,
    skip_bad_records: bool,
    transforms: Sequence[RecordTransform],
    extra_fields: Sequence[str],
    process_index: int,
    process_count: int,
    num_epochs: int | None,
    kl_sequences: bool = False,
    train_on_prompt: bool = False,
    num_samples: int = 0,
    num_correct: int = 0,
    num_incorrect: int = 0,
) -> BatchIterator:
    if kind not in _KINDS:
        raise ValueError(f"unknown pipeline kind {kind!r}")
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if max_prompt_len is None:
        max_prompt_len = max_len // 2
    formats.check_lengths(max_len, max_prompt_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_ranked = num_correct + num_incorrect
    seqs_per_example = sequences_per_example(kind, kl_sequences, num_samples, num_ranked)
    if pack:
        pack_rows = pack_rows or max(1, batch_size * seqs_per_example // 2)
        if pack_rows < seqs_per_example:  # so that any one example fits an empty batch
            raise ValueError(f"pack_rows must be >= {seqs_per_example}, got {pack_rows}")
    if length_buckets is None:
        length_buckets = default_length_buckets(max_len) if process_count == 1 else (max_len,)
    if max(length_buckets) < max_len:
        length_buckets = (*length_buckets, max_len)
    template = get_template(template, tokenizer)

    source = open_source(
        path, _checked(parse, template), transforms=transforms, skip_bad_records=skip_bad_records
    )
    tokenize = functools.partial(
        _tokenize,
        tokenizer=tokenizer,
        template=template,
        max_len=max_len,
        max_prompt_len=max_prompt_len,
        add_bos=add_bos,
    )
    ds, num_examples = _index_dataset(
        source, tokenize, seed, shuffle, num_epochs, process_index, process_count
    )
    fingerprint = {
        "kind": kind,
        "path_records": len(source),
        "num_examples": num_examples,
        "seed": seed,
        "shuffle": shuffle,
        "batch_size": batch_size,
        "max_len": max_len,
        "max_prompt_len": max_prompt_len,
        "pack": pack,
        "pack_rows": pack_rows,
        "process_index": process_index,
        "process_count": process_count,
        "num_epochs": num_epochs,
    }
    # Recorded only when set, so states saved before these options existed still resume.
    fingerprint |= {
        k: True
        for k, on in (("kl_sequences", kl_sequences), ("train_on_prompt", train_on_prompt))
        if on
    }
    fingerprint |= {
        k: n
        for k, n in (
            ("num_samples", num_samples),
            ("num_correct", num_correct),
            ("num_incorrect", num_incorrect),
        )
        if n
    }
    return BatchIterator(
        ds,
        source,
        kind=kind,
        batch_size=batch_size,
        max_len=max_len,
        pack=pack,
        pack_rows=pack_rows,
        length_buckets=length_buckets,
        pad_id=tokenizer.pad_id,
        extra_fields=extra_fields,
        num_examples=num_examples,
        fingerprint=fingerprint,
        kl_sequences=kl_sequences,
        train_on_prompt=train_on_prompt,
        num_samples=num_samples,
        num_ranked=num_ranked,
    )


def make_sft_pipeline(
    path: str,
    tokenizer: Tokenizer | str,
    *,
    batch_size: int,
    max_len: int,
    max_prompt_len: int | None = None,
    pack: bool = False,
    pack_rows: int | None = None,
    length_buckets: Sequence[int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    template: str | Template = "plain",
    add_bos: bool = True,
    skip_bad_records: bool = False,
    transforms: Sequence[RecordTransform] = (),
    extra_fields: Sequence[str] = (),
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    train_on_prompt: bool = False,
) -> BatchIterator:
    """SFT batches: B = batch_size sequences, sequence i is example i; loss on the completion.

    Args:
      path: the records: a JSONL, Parquet, Arrow or ArrayRecord file, a ``datasets`` directory,
        or a directory or glob of shards, local or remote (`jaxalign.data.sources.open_source`;
        record formats in `jaxalign.data.formats`).
      tokenizer: a `Tokenizer`, or a path for `load_tokenizer`.
      batch_size: examples (here sequences) per batch on this host.
      max_len: row length T in pack mode and the largest length bucket; a sequence fills at most
        max_len positions (max_len + 1 tokens with BOS and EOS; see `jaxalign.data.formats`).
      max_prompt_len: prompt tokens kept (BOS included), cut from the left; default max_len // 2.
      pack: first-fit packing into `pack_rows` rows of max_len; False: one sequence per row, padded
        to a length bucket.
      pack_rows: rows R of a packed batch; default max(1, B // 2).
      length_buckets: pad-mode row lengths; default powers of two from 16, plus max_len.
      seed: shuffle seed (a new permutation each epoch).
      shuffle: False keeps file order (evaluation).
      template: template name ("plain", "chatml", "llama3", "raw"), "tokenizer" (the tokenizer's
        own chat template, `jaxalign.data.templates`) or a `Template`.
      add_bos: prepend the tokenizer's BOS id (if it has one).
      skip_bad_records: skip and count malformed records (``it.num_bad_records``), don't raise.
      transforms: record-level transforms (dict -> list of dicts), e.g. `reward_augment`.
      extra_fields: numeric record fields carried into the batch as float32 [batch_size] arrays.
      process_index, process_count: this host's slice ``[process_index::process_count]``.
      num_epochs: passes over the data; None repeats forever.
      train_on_prompt: the loss mask covers the prompt tokens too (not only the response).

    Returns:
      a `BatchIterator` of batch dicts (layout in this module's docstring); ``get_state()`` /
      ``set_state()`` checkpoint its position.
    """
    parse = functools.partial(formats.parse_sft, extra_fields=tuple(extra_fields))
    return _make_pipeline("sft", parse, path, tokenizer, **_kw(locals()))


def make_pair_pipeline(
    path: str,
    tokenizer: Tokenizer | str,
    *,
    batch_size: int,
    max_len: int,
    max_prompt_len: int | None = None,
    pack: bool = False,
    pack_rows: int | None = None,
    length_buckets: Sequence[int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    template: str | Template = "plain",
    add_bos: bool = True,
    skip_bad_records: bool = False,
    transforms: Sequence[RecordTransform] = (),
    extra_fields: Sequence[str] = (),
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    train_on_prompt: bool = False,
) -> BatchIterator:
    """Preference-pair batches: P = batch_size pairs, B = 2P sequences.

    Sequence i is the chosen response of pair i, sequence P + i the rejected one; ``example_mask``
    and each ``extra_fields`` array (e.g. "margin") are [P]. Arguments as in `make_sft_pipeline`,
    with batch_size counting pairs (pack_rows defaults to P).
    """
    parse = functools.partial(formats.parse_pair, extra_fields=tuple(extra_fields))
    return _make_pipeline("pair", parse, path, tokenizer, **_kw(locals()))


def make_contrast_pipeline(
    path: str,
    tokenizer: Tokenizer | str,
    *,
    batch_size: int,
    max_len: int,
    max_prompt_len: int | None = None,
    pack: bool = False,
    pack_rows: int | None = None,
    length_buckets: Sequence[int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    template: str | Template = "plain",
    add_bos: bool = True,
    skip_bad_records: bool = False,
    transforms: Sequence[RecordTransform] = (),
    extra_fields: Sequence[str] = (),
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    train_on_prompt: bool = False,
) -> BatchIterator:
    """Pairs with an alternative context (Re-Align) from ``{prompt, chosen, rejected,
    contrast_prompt}`` records: P = batch_size pairs, B = 3P sequences; i chosen, P + i rejected,
    2P + i the chosen response after the contrast prompt. Arguments as in `make_sft_pipeline`."""
    parse = functools.partial(formats.parse_contrast, extra_fields=tuple(extra_fields))
    return _make_pipeline("contrast", parse, path, tokenizer, **_kw(locals()))


def make_judgment_pipeline(
    path: str,
    tokenizer: Tokenizer | str,
    *,
    batch_size: int,
    max_len: int,
    max_prompt_len: int | None = None,
    pack: bool = False,
    pack_rows: int | None = None,
    length_buckets: Sequence[int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    template: str | Template = "plain",
    add_bos: bool = True,
    skip_bad_records: bool = False,
    transforms: Sequence[RecordTransform] = (),
    extra_fields: Sequence[str] = (),
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    train_on_prompt: bool = False,
) -> BatchIterator:
    """Judged-response batches (CUT) from ``{prompt, response, judgment}`` records: E =
    batch_size examples, B = 2E sequences; sequence i is the response after the prompt x,
    sequence E + i the same response tokens after x with the judgment appended
    (`jaxalign.data.formats.parse_judgment`). Arguments as in `make_sft_pipeline`."""
    parse = functools.partial(formats.parse_judgment, extra_fields=tuple(extra_fields))
    return _make_pipeline("judgment", parse, path, tokenizer, **_kw(locals()))


def make_unpaired_pipeline(
    path: str,
    tokenizer: Tokenizer | str,
    *,
    batch_size: int,
    max_len: int,
    max_prompt_len: int | None = None,
    pack: bool = False,
    pack_rows: int | None = None,
    length_buckets: Sequence[int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    template: str | Template = "plain",
    add_bos: bool = True,
    skip_bad_records: bool = False,
    transforms: Sequence[RecordTransform] = (),
    extra_fields: Sequence[str] = (),
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    train_on_prompt: bool = False,
    kl_sequences: bool = False,
) -> BatchIterator:
    """Unpaired (KTO-style) batches: B = batch_size sequences, sequence i is example i.

    Adds ``labels`` float32 [B] (1.0 desirable, 0.0 undesirable, 0.0 on empty slots). Arguments as
    in `make_sft_pipeline`; ``kl_sequences=True`` adds the mismatched (prompt_i, completion_j)
    sequences B + i for KTO's KL baseline (module doc), and then a packed example places only if
    both its sequences fit.
    """
    parse = functools.partial(formats.parse_unpaired, extra_fields=tuple(extra_fields))
    return _make_pipeline("unpaired", parse, path, tokenizer, **_kw(locals()))


def make_negatives_pipeline(
    path: str,
    tokenizer: Tokenizer | str,
    *,
    num_samples: int,
    batch_size: int,
    max_len: int,
    max_prompt_len: int | None = None,
    pack: bool = False,
    pack_rows: int | None = None,
    length_buckets: Sequence[int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    template: str | Template = "plain",
    add_bos: bool = True,
    skip_bad_records: bool = False,
    transforms: Sequence[RecordTransform] = (),
    extra_fields: Sequence[str] = (),
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    train_on_prompt: bool = False,
) -> BatchIterator:
    """D2O batches of negatives records ``{prompt, rejected, samples: [K]}``: E = batch_size
    records, B = (1 + K) E sequences (sequence i the rejected response of example i, sequence
    (1 + k) E + i its sample k). A record whose ``samples`` holds another number than
    ``num_samples`` (K >= 1) fails naming its file and line. Arguments as in `make_sft_pipeline`.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    parse = functools.partial(
        formats.parse_negatives, num_samples=num_samples, extra_fields=tuple(extra_fields)
    )
    return _make_pipeline("negatives", parse, path, tokenizer, **_kw(locals()))


def make_ranked_pipeline(
    path: str,
    tokenizer: Tokenizer | str,
    *,
    num_correct: int,
    num_incorrect: int,
    batch_size: int,
    max_len: int,
    max_prompt_len: int | None = None,
    pack: bool = False,
    pack_rows: int | None = None,
    length_buckets: Sequence[int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    template: str | Template = "plain",
    add_bos: bool = True,
    skip_bad_records: bool = False,
    transforms: Sequence[RecordTransform] = (),
    extra_fields: Sequence[str] = (),
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    train_on_prompt: bool = False,
) -> BatchIterator:
    """AFT batches of ranked records ``{prompt, correct: [P], incorrect: [N]}``: E = batch_size
    records, B = (P + N) E sequences (sequence k E + i response k of example i: its correct ones,
    then its incorrect ones). A record whose lists hold another number than ``num_correct`` /
    ``num_incorrect`` (both >= 1) fails naming its file and line. Arguments as in
    `make_sft_pipeline`."""
    if num_correct < 1 or num_incorrect < 1:
        raise ValueError(
            f"num_correct and num_incorrect must be >= 1, got {num_correct}, {num_incorrect}"
        )
    parse = functools.partial(
        formats.parse_ranked,
        num_correct=num_correct,
        num_incorrect=num_incorrect,
        extra_fields=tuple(extra_fields),
    )
    return _make_pipeline("ranked", parse, path, tokenizer, **_kw(locals()))


def make_ratings_pipeline(
    path: str,
    tokenizer: Tokenizer | str,
    *,
    num_ratings: int,
    batch_size: int,
    max_len: int,
    max_prompt_len: int | None = None,
    pack: bool = False,
    pack_rows: int | None = None,
    length_buckets: Sequence[int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    template: str | Template = "plain",
    add_bos: bool = True,
    skip_bad_records: bool = False,
    transforms: Sequence[RecordTransform] = (),
    extra_fields: Sequence[str] = (),
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    train_on_prompt: bool = False,
) -> BatchIterator:
    """Rated-response batches (multi-objective reward models): B = batch_size sequences, sequence i
    is example i, from ``{prompt, response, ratings: [k numbers]}`` records, k = ``num_ratings``
    (another count is a `DataError` naming the file and line).

    Adds ``ratings`` float32 [B, k] (0 on empty slots). Arguments as in `make_sft_pipeline`.
    """
    parse = functools.partial(
        formats.parse_ratings, num_ratings=num_ratings, extra_fields=tuple(extra_fields)
    )
    return _make_pipeline("ratings", parse, path, tokenizer, **_kw(locals()))


def _kw(local_vars: dict) -> dict:
    skip = ("path", "tokenizer", "parse", "num_ratings")
    return {k: v for k, v in local_vars.items() if k not in skip}


def _encode_prompt_example(
    example: dict, *, tokenizer, template: Template, max_prompt_len: int, add_bos: bool
) -> dict:
    ids = formats.encode_prompt(
        tokenizer,
        template,
        example["messages"],
        example["system"],
        max_prompt_len=max_prompt_len + 1,  # one more: a cut prompt shows itself
        add_bos=add_bos,
    )
    truncated = len(ids) > max_prompt_len
    if truncated:  # cut from the left, BOS kept
        bos = len(formats.bos_ids(tokenizer, template, add_bos))
        ids = ids[:bos] + ids[bos + 1 :]
    return {"ids": np.asarray(ids, np.int32), "record": example["record"], "truncated": truncated}


class PromptIterator(_ResumableIterator):
    """Iterator of left-padded prompt batches for generation (RL rollouts, evaluation).

    Each batch holds B = batch_size prompts, left-padded to Tp = the smallest length bucket >= the
    longest prompt, so every prompt ends at column Tp - 1 and decoding starts at the same step:

        prompt_tokens      int32   [B, Tp]  pad_id on the left padding
        prompt_segment_ids int32   [B, Tp]  1 on prompt tokens, 0 on padding
        prompt_positions   int32   [B, Tp]  0, 1, ... from each prompt's first token, 0 on padding
        prompt_lengths     int32   [B]
        example_mask       float32 [B]      0 for empty slots at the end of finite data
        records            list[dict | None] (Python objects, not arrays) the raw records
                           (e.g. with a reference "answer" for a judge); None for empty slots.

    Remove ``records`` before sending the arrays to devices.
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        source: Source,
        *,
        batch_size: int,
        length_buckets: Sequence[int],
        pad_id: int,
        num_examples: int,
        fingerprint: dict,
    ):
        super().__init__(dataset, source, fingerprint)
        self.batch_size = batch_size
        self.length_buckets = tuple(sorted(length_buckets))
        self.pad_id = pad_id
        self.num_examples = num_examples
        self.num_truncated = 0  # prompts cut to max_prompt_len, counted as batches are built

    def __next__(self) -> dict:
        if self._next >= self._len:
            raise StopIteration
        n = min(self.batch_size, self._len - self._next)
        examples = [self._ds[self._next + j] for j in range(n)]
        self._next += n
        self.num_truncated += sum(ex["truncated"] for ex in examples)
        B = self.batch_size
        lengths = np.zeros(B, np.int32)
        lengths[:n] = [len(ex["ids"]) for ex in examples]
        Tp = next(b for b in self.length_buckets if b >= lengths.max())
        tokens = np.full((B, Tp), self.pad_id, np.int32)
        segment_ids = np.zeros((B, Tp), np.int32)
        positions = np.zeros((B, Tp), np.int32)
        for i, ex in enumerate(examples):
            L = lengths[i]
            tokens[i, Tp - L :] = ex["ids"]
            segment_ids[i, Tp - L :] = 1
            positions[i, Tp - L :] = np.arange(L)
        example_mask = np.zeros(B, np.float32)
        example_mask[:n] = 1.0
        return {
            "prompt_tokens": tokens,
            "prompt_segment_ids": segment_ids,
            "prompt_positions": positions,
            "prompt_lengths": lengths,
            "example_mask": example_mask,
            "records": [ex["record"] for ex in examples] + [None] * (B - n),
        }


def make_prompt_pipeline(
    path: str,
    tokenizer: Tokenizer | str,
    *,
    batch_size: int,
    max_prompt_len: int,
    length_buckets: Sequence[int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    template: str | Template = "plain",
    add_bos: bool = True,
    skip_bad_records: bool = False,
    transforms: Sequence[RecordTransform] = (),
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
) -> PromptIterator:
    """Prompt batches for generation from records ``{"prompt": str | messages, ...}``.

    The prompt is templated like the training prompts (so generation continues exactly where a
    response would start), cut from the left to max_prompt_len tokens (BOS kept). length_buckets
    default to powers of two from 16 plus max_prompt_len (only max_prompt_len when
    process_count > 1). Other arguments as in `make_sft_pipeline`; layout in `PromptIterator`.
    """
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if batch_size < 1 or max_prompt_len < 1:
        raise ValueError(
            f"need batch_size, max_prompt_len >= 1, got {batch_size}, {max_prompt_len}"
        )
    if length_buckets is None:
        length_buckets = (
            default_length_buckets(max_prompt_len) if process_count == 1 else (max_prompt_len,)
        )
    if max(length_buckets) < max_prompt_len:
        length_buckets = (*length_buckets, max_prompt_len)
    template = get_template(template, tokenizer)
    source = open_source(
        path,
        _checked(formats.parse_prompt, template),
        transforms=transforms,
        skip_bad_records=skip_bad_records,
    )
    encode = functools.partial(
        _encode_prompt_example,
        tokenizer=tokenizer,
        template=template,
        max_prompt_len=max_prompt_len,
        add_bos=add_bos,
    )
    ds, num_examples = _index_dataset(
        source, encode, seed, shuffle, num_epochs, process_index, process_count
    )
    fingerprint = {
        "kind": "prompt",
        "path_records": len(source),
        "num_examples": num_examples,
        "seed": seed,
        "shuffle": shuffle,
        "batch_size": batch_size,
        "max_prompt_len": max_prompt_len,
        "process_index": process_index,
        "process_count": process_count,
        "num_epochs": num_epochs,
    }
    return PromptIterator(
        ds,
        source,
        batch_size=batch_size,
        length_buckets=length_buckets,
        pad_id=tokenizer.pad_id,
        num_examples=num_examples,
        fingerprint=fingerprint,
    )


class Prefetch:
    """Builds the next batches of a pipeline iterator on a background thread.

    Batch building is host work that can overlap the device step. ``get_state()`` is the state after
    the last batch *returned* (not the last one built), so checkpoints stay exact; ``set_state()``
    drops the batches built ahead and continues from the given state. ``close()`` stops the thread.
    """

    def __init__(self, iterator: BatchIterator | PromptIterator, buffer_size: int = 2):
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self.iterator = iterator
        self.buffer_size = buffer_size
        self._state = iterator.get_state()
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self.buffer_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        """Queue `item` unless stopped first (so `close` never waits on a full queue)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for batch in self.iterator:
                if not self._put((batch, self.iterator.get_state())):
                    return
            self._put((StopIteration, None))
        except Exception as e:  # re-raised in the consumer thread
            self._put((e, None))

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            self._start()
        item, state = self._queue.get()
        if isinstance(item, BaseException) or item is StopIteration:
            self._queue.put((item, None))  # keep raising on later calls
            raise item
        self._state = state
        return item

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        self.close()
        self.iterator.set_state(state)
        self._state = self.iterator.get_state()

    def close(self) -> None:
        """Stop the background thread (the next ``next()`` restarts it at ``get_state()``)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.iterator.set_state(self._state)

    @property
    def num_bad_records(self) -> int:
        return self.iterator.num_bad_records

    @property
    def num_truncated(self) -> int:
        return self.iterator.num_truncated
