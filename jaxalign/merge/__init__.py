"""Weight-space merging: pure methods on tensors and params trees (`methods`), and the streaming
`jaxalign merge` driver over Hugging Face directories and jaxalign checkpoints (`driver`)."""

from jaxalign.merge.methods import (
    METHODS,
    MergeOptions,
    RestoreRule,
    dare,
    dare_key,
    disjoint_mean,
    drop,
    linear,
    merge_tensor,
    merge_tree,
    relative_change,
    restore,
    restore_selection,
    slerp,
    task_arithmetic,
    ties,
    trim,
    tsv,
)

__all__ = [
    "METHODS",
    "MergeOptions",
    "RestoreRule",
    "dare",
    "dare_key",
    "disjoint_mean",
    "drop",
    "linear",
    "merge_tensor",
    "merge_tree",
    "relative_change",
    "restore",
    "restore_selection",
    "slerp",
    "task_arithmetic",
    "ties",
    "trim",
    "tsv",
]
