"""jaxalign.data: tokenizers, templates, record sources, record formats and Grain batch pipelines.

Batch layout: `jaxalign.data.layout`; pipeline semantics: `jaxalign.data.pipeline`; which
pipeline reads a `BatchSpec`: `jaxalign.data.batches`. Record formats and the truncation
policy: `jaxalign.data.formats`. The bundled demo task: `jaxalign.data.demo_task`.
"""

from jaxalign.data.batches import WithRetain, make_batches
from jaxalign.data.errors import DataError, RecordError
from jaxalign.data.formats import (
    encode_prompt,
    parse_negatives,
    parse_pair,
    parse_prompt,
    parse_ranked,
    parse_sft,
    parse_unpaired,
    split_transcripts,
    tokenize_example,
)
from jaxalign.data.layout import CACHE_FIELDS, BatchSpec
from jaxalign.data.pipeline import (
    BatchIterator,
    Prefetch,
    PromptIterator,
    default_length_buckets,
    make_contrast_pipeline,
    make_judgment_pipeline,
    make_negatives_pipeline,
    make_pair_pipeline,
    make_prompt_pipeline,
    make_ranked_pipeline,
    make_ratings_pipeline,
    make_sft_pipeline,
    make_unpaired_pipeline,
)
from jaxalign.data.ref_cache import (
    load_ref_cache,
    make_ref_join,
    record_key,
    write_ref_cache,
)
from jaxalign.data.sources import JsonlSource, RowSource, ShardedSource, open_source
from jaxalign.data.templates import TEMPLATES, Template, get_template, load_chat_template
from jaxalign.data.tokenizers import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer
from jaxalign.data.transforms import (
    direction_system,
    make_direction_system,
    make_reward_augment,
    reward_augment,
)

__all__ = [
    "CACHE_FIELDS",
    "TEMPLATES",
    "BatchIterator",
    "BatchSpec",
    "DataError",
    "HFTokenizer",
    "JsonlSource",
    "Prefetch",
    "PromptIterator",
    "RecordError",
    "RowSource",
    "SentencePieceTokenizer",
    "ShardedSource",
    "Template",
    "WithRetain",
    "Tokenizer",
    "default_length_buckets",
    "encode_prompt",
    "get_template",
    "load_chat_template",
    "load_ref_cache",
    "load_tokenizer",
    "direction_system",
    "make_batches",
    "make_negatives_pipeline",
    "make_ranked_pipeline",
    "make_direction_system",
    "make_contrast_pipeline",
    "make_judgment_pipeline",
    "make_pair_pipeline",
    "make_prompt_pipeline",
    "make_ratings_pipeline",
    "make_ref_join",
    "make_reward_augment",
    "make_sft_pipeline",
    "make_unpaired_pipeline",
    "open_source",
    "parse_negatives",
    "parse_ranked",
    "parse_pair",
    "parse_prompt",
    "parse_sft",
    "parse_unpaired",
    "record_key",
    "reward_augment",
    "split_transcripts",
    "tokenize_example",
    "write_ref_cache",
]
