"""The batch layout: every key a batch can hold, with its dimensions and dtype, in one place.

The pipelines write batches in this layout (`row_arrays`, `example_arrays`), the training steps
read it (`data_fields`), the compile-only plan shapes abstract batches from it (`abstract`) and the
reference cache names its fields from it (`CACHE_FIELDS`).

Dimensions (letters used across the codebase):

    A  micro-batches (the trainer stacks A host batches on a leading axis)
    R  rows of a batch,  T  tokens per row
    E  examples of a batch (pairs for pair batches: P = E)
    B  sequences of a batch: B = E, or 2E for pairs (sequence i is the chosen response of pair i,
       sequence E + i the rejected one; for judgments, sequence E + i is example i's response after
       the prompt with the judgment; for contrast pairs B = 3E, sequence 2E + i the chosen response
       after the contrast prompt) and for KTO's mismatched-pair KL sequences (sequence E + i is
       example i's prompt with another example's completion), or (1 + K) E for D2O's negatives
       records (sequence i the rejected response of example i, sequence (1 + k) E + i its sample
       k, K = `num_samples`), or (P + N) E for AFT's ranked records (sequence k E + i response k
       of example i: P correct, then N incorrect)
    M  values per example of a list-valued data field (e.g. modpo's margins)

A training batch (one host's micro-batch):

    tokens       int32   [R, T]  input ids (the pad id on padding)
    targets      int32   [R, T]  next-token ids (the pad id on padding)
    loss_mask    float32 [R, T]  1 where the target is a response token (response text + EOS)
    positions    int32   [R, T]  0, 1, ... restarting for each sequence (0 on padding)
    segment_ids  int32   [R, T]  1, 2, ... per sequence within a row, 0 = padding
    seq_index    int32   [R, T]  the sequence (0..B-1) a token belongs to, -1 = padding
    example_mask float32 [E]     1 for real examples, 0 for empty slots
    labels       float32 [E]     unpaired records only: 1.0 desirable, 0.0 undesirable
    ratings      float32 [E, k]  ratings records only: the k ratings of each response
    <field>      float32 [E] or [E, M]   a numeric record field (`data.extra_fields`, or the
                                         reference cache's `CACHE_FIELDS`), 0 on empty slots
    retain/<key>          an SFT batch of the retain set, every key above under this prefix

A rollout batch (online RL, `jaxalign.rl.rollout`): one completion per row, sequence r = row r,
the rows above plus float32 [R, T] token fields aligned with the targets (`BatchSpec.token_fields`:
the sampler's and the old policy's log-probs, the reference's, advantages, values, returns).

A prompt batch (generation), left-padded so every prompt ends at column Tp - 1:

    prompt_tokens      int32   [E, Tp]
    prompt_segment_ids int32   [E, Tp]  1 on prompt tokens, 0 on padding
    prompt_positions   int32   [E, Tp]  0, 1, ... from each prompt's first token
    prompt_lengths     int32   [E]
    example_mask       float32 [E]
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import numpy as np

ROW_FIELDS: dict[str, type] = {
    "tokens": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "positions": np.int32,
    "segment_ids": np.int32,
    "seq_index": np.int32,
}
PROMPT_FIELDS: dict[str, type] = {
    "prompt_tokens": np.int32,
    "prompt_segment_ids": np.int32,
    "prompt_positions": np.int32,
}
EXAMPLE_MASK = "example_mask"
LABELS = "labels"
RATINGS = "ratings"
RETAIN_PREFIX = "retain/"
# Per-pair reference log-probs from `jaxalign cache-ref` (sums over the response, and over the
# first min(|y_w|, |y_l|) response tokens for LD-DPO).
CACHE_FIELDS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "ref_chosen_prefix_logps",
    "ref_rejected_prefix_logps",
)
# The same for single-response records (the unpaired family: SFT or unpaired records), e.g. the
# aligned model's log-probs of PoFT: the reference sum over the response.
SINGLE_CACHE_FIELDS = ("ref_logps",)


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What a family's batches hold beyond the row arrays.

    records: the record format they are read from ("sft" `{prompt, completion}` or messages,
      "pair" `{prompt, chosen, rejected}`, "unpaired" `{prompt, completion, label}`, "negatives"
      `{prompt, rejected, samples}`, "ratings" `{prompt, response, ratings}`, "judgment"
      `{prompt, response, judgment}`: the response after the prompt, then after the prompt with
      the judgment; "contrast" `{prompt, chosen, rejected, contrast_prompt}`: a pair, then the
      chosen response after the contrast prompt; "ranked" `{prompt, correct, incorrect}`: P correct
      then N incorrect responses, AFT), or
      "rollout" (built from sampled completions, `jaxalign.rl.rollout`).
    kl_sequences: unpaired batches also carry each example's mismatched KL sequence (KTO).
    fields: per-example float32 data fields beside `example_mask` (labels excluded: they follow
      from `records`), e.g. `data.extra_fields` and the cached reference log-probs.
    retain: an SFT batch of the retain set rides along under `RETAIN_PREFIX`.
    token_fields: float32 [R, T] fields aligned with the targets (rollout batches).
    num_samples: K, the self-generated responses per negatives record (D2O).
    num_correct, num_incorrect: P and N, the responses per ranked record (AFT).
    """

    records: Literal[
        "sft",
        "pair",
        "unpaired",
        "negatives",
        "ratings",
        "judgment",
        "contrast",
        "ranked",
        "rollout",
    ]
    kl_sequences: bool = False
    fields: tuple[str, ...] = ()
    retain: bool = False
    token_fields: tuple[str, ...] = ()
    num_samples: int = 0
    num_ratings: int = 0
    num_correct: int = 0
    num_incorrect: int = 0

    @property
    def sequences_per_example(self) -> int:
        if self.records == "negatives":
            return 1 + self.num_samples
        if self.records == "ranked":
            return self.num_correct + self.num_incorrect
        if self.records == "contrast":
            return 3
        return 2 if self.records in ("pair", "judgment") or self.kl_sequences else 1


def row_arrays(R: int, T: int, pad_id: int) -> dict[str, np.ndarray]:
    """Empty row arrays of a batch (padding everywhere), for a pipeline to fill in."""
    fill = {"tokens": pad_id, "targets": pad_id, "seq_index": -1}
    return {k: np.full((R, T), fill.get(k, 0), dtype) for k, dtype in ROW_FIELDS.items()}


def example_arrays(values: list[list], names: tuple[str, ...], E: int) -> dict[str, np.ndarray]:
    """float32 [E] (or [E, M]) per-example fields from the values of the batch's real examples
    (`values[i][j]`: field j of example i), 0 on the empty slots after them."""
    out = {}
    for j, name in enumerate(names):
        real = np.asarray([v[j] for v in values], np.float32)
        arr = np.zeros((E, *real.shape[1:]), np.float32)
        arr[: len(values)] = real
        out[name] = arr
    return out


def data_fields(batch: dict) -> dict:
    """The keys of a batch that are data for the losses (labels, example_mask, numeric fields,
    cached reference log-probs), not the row layout or the retain set's batch."""
    return {
        k: v for k, v in batch.items() if k not in ROW_FIELDS and not k.startswith(RETAIN_PREFIX)
    }


def retain_batch(batch: dict) -> dict:
    """The retain set's batch carried under `RETAIN_PREFIX` ({} when there is none)."""
    n = len(RETAIN_PREFIX)
    return {k[n:]: v for k, v in batch.items() if k.startswith(RETAIN_PREFIX)}


def abstract(
    spec: BatchSpec, *, examples: int, rows: int, T: int, micro_batches: int, sharding
) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a stacked batch `[A, ...]` in this layout (scalar fields only: a
    list-valued field's M is not known without the data). `sharding(ndim)` gives each array's
    sharding by its rank (rows over the batch axes)."""

    def struct(shape, dtype):
        shape = (micro_batches, *shape)
        return jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding(len(shape)))

    one = {k: struct((rows, T), dtype) for k, dtype in ROW_FIELDS.items()}
    names = (EXAMPLE_MASK, *((LABELS,) if spec.records == "unpaired" else ()), *spec.fields)
    one |= {k: struct((examples,), np.float32) for k in names}
    one |= {k: struct((rows, T), np.float32) for k in spec.token_fields}
    if spec.records == "ratings":
        one[RATINGS] = struct((examples, spec.num_ratings), np.float32)
    if spec.retain:
        sft = abstract(
            BatchSpec("sft"),
            examples=examples,
            rows=examples,
            T=T,
            micro_batches=micro_batches,
            sharding=sharding,
        )
        one |= {RETAIN_PREFIX + k: v for k, v in sft.items()}
    return one
