"""The batch iterator for a `BatchSpec`: which pipeline reads which records, and the retain set.

- records "sft": `make_sft_pipeline` (SFT records; also NPO's forget set);
- records "pair": `make_pair_pipeline`;
- records "negatives": `make_negatives_pipeline` (D2O, `{prompt, rejected, samples}`);
- records "ranked": `make_ranked_pipeline` (AFT, `{prompt, correct: [P], incorrect: [N]}`);
- records "ratings": `make_ratings_pipeline` (`{prompt, response, ratings}`, k = spec.num_ratings);
- records "contrast": `make_contrast_pipeline` (Re-Align's pairs with a `contrast_prompt`);
- records "judgment": `make_judgment_pipeline` (CUT's `{prompt, response, judgment}`);
- records "unpaired": `make_unpaired_pipeline` (`{prompt, completion, label}`), with KTO's
  mismatched KL sequences when ``spec.kl_sequences``;
- ``spec.retain``: an SFT file read alongside, a batch of the same size per step, its arrays under
  "retain/<key>" (`WithRetain`); e.g. NPO+GD, whose mix reads them as `retain_logps` /
  `retain_lengths`. The retain stream is endless (it never ends an evaluation early) and its
  position is saved with the main stream's.
"""

from __future__ import annotations

from jaxalign.data.layout import RETAIN_PREFIX, BatchSpec
from jaxalign.data.pipeline import (
    BatchIterator,
    make_contrast_pipeline,
    make_judgment_pipeline,
    make_negatives_pipeline,
    make_pair_pipeline,
    make_ranked_pipeline,
    make_ratings_pipeline,
    make_sft_pipeline,
    make_unpaired_pipeline,
)


class WithRetain:
    """Iterator of main batches with the retain set's batch merged in under "retain/<key>"."""

    def __init__(self, main: BatchIterator, retain: BatchIterator):
        self.main = main
        self.retain = retain

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.main)
        return batch | {RETAIN_PREFIX + k: v for k, v in next(self.retain).items()}

    def get_state(self) -> dict:
        return {"main": self.main.get_state(), "retain": self.retain.get_state()}

    def set_state(self, state: dict) -> None:
        self.main.set_state(state["main"])
        self.retain.set_state(state["retain"])

    @property
    def num_bad_records(self) -> int:
        return self.main.num_bad_records + self.retain.num_bad_records

    @property
    def num_truncated(self) -> int:
        return self.main.num_truncated + self.retain.num_truncated


def make_batches(
    spec: BatchSpec,
    path: str,
    tokenizer,
    *,
    retain_path: str = "",
    **options,
) -> BatchIterator | WithRetain:
    """Batches holding what `spec` describes, from the records at `path`.

    `spec.fields` are read from each record (after the record `transforms` in `options`, e.g. the
    reference-cache join that adds `CACHE_FIELDS`). `options`: the pipeline arguments shared by
    every kind (batch_size, max_len, ..., num_epochs; see `make_sft_pipeline`).
    """
    extra_fields = spec.fields
    if spec.records == "pair":
        pipeline = make_pair_pipeline(path, tokenizer, extra_fields=extra_fields, **options)
    elif spec.records == "negatives":
        pipeline = make_negatives_pipeline(
            path, tokenizer, num_samples=spec.num_samples, extra_fields=extra_fields, **options
        )
    elif spec.records == "ranked":
        pipeline = make_ranked_pipeline(
            path,
            tokenizer,
            num_correct=spec.num_correct,
            num_incorrect=spec.num_incorrect,
            extra_fields=extra_fields,
            **options,
        )
    elif spec.records == "contrast":
        pipeline = make_contrast_pipeline(path, tokenizer, extra_fields=extra_fields, **options)
    elif spec.records == "judgment":
        pipeline = make_judgment_pipeline(path, tokenizer, extra_fields=extra_fields, **options)
    elif spec.records == "unpaired":
        pipeline = make_unpaired_pipeline(
            path, tokenizer, extra_fields=extra_fields, kl_sequences=spec.kl_sequences, **options
        )
    elif spec.records == "ratings":
        pipeline = make_ratings_pipeline(
            path, tokenizer, num_ratings=spec.num_ratings, extra_fields=extra_fields, **options
        )
    else:
        pipeline = make_sft_pipeline(path, tokenizer, extra_fields=extra_fields, **options)
    if not spec.retain:
        return pipeline
    retain_options = options | {"transforms": (), "num_epochs": None}
    return WithRetain(pipeline, make_sft_pipeline(retain_path, tokenizer, **retain_options))
