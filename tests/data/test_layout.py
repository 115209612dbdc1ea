"""The pipelines write exactly the batch layout that `jaxalign.data.layout` describes (and that the
compile-only plan shapes abstract batches from)."""

import json
import pathlib

import numpy as np
import pytest

from jaxalign.data import BatchSpec, layout, load_tokenizer, make_batches

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO = ROOT / "data/demo"

CASES = {
    "sft": (BatchSpec("sft"), "sft_train.jsonl"),
    "pair": (BatchSpec("pair", fields=("margin",)), "pairs_train.jsonl"),
    "unpaired": (BatchSpec("unpaired"), "unpaired_train.jsonl"),
    "kto": (BatchSpec("unpaired", kl_sequences=True), "unpaired_train.jsonl"),
    "retain": (BatchSpec("sft", retain=True), "sft_train.jsonl"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_batches_have_the_layout_shapes_and_dtypes(name, tmp_path):
    spec, file = CASES[name]
    path = DEMO / file
    if spec.fields:  # give every record the numeric field
        lines = path.read_text().splitlines()[:64]
        path = tmp_path / file
        path.write_text("".join(json.dumps(json.loads(x) | {"margin": 0.5}) + "\n" for x in lines))
    E, T = 4, 64
    batch = next(
        make_batches(
            spec,
            str(path),
            load_tokenizer(str(DEMO / "tokenizer.model")),
            retain_path=str(DEMO / "sft_train.jsonl"),
            batch_size=E,
            max_len=T,
            max_prompt_len=32,
            length_buckets=(T,),
        )
    )
    rows = E * spec.sequences_per_example
    want = layout.abstract(
        spec, examples=E, rows=rows, T=T, micro_batches=1, sharding=lambda ndim: None
    )
    assert sorted(batch) == sorted(want)
    for key, struct in want.items():
        assert batch[key].shape == struct.shape[1:], key
        assert batch[key].dtype == struct.dtype, key
    assert set(layout.data_fields(batch)) == {
        k for k in want if k not in layout.ROW_FIELDS and not k.startswith(layout.RETAIN_PREFIX)
    }
    np.testing.assert_array_equal(batch["example_mask"], np.ones(E, np.float32))
    if spec.retain:
        assert sorted(layout.retain_batch(batch)) == sorted(
            layout.abstract(
                BatchSpec("sft"), examples=E, rows=E, T=T, micro_batches=1, sharding=lambda n: None
            )
        )
