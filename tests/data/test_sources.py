"""Record sources: JSONL, Parquet, Arrow / `datasets` directories, ArrayRecord and shard sets give
the same records and the same batches (per-host slices, shuffling, resumable state); bad rows are
named by file and row; directories, globs and URIs resolve as documented."""

import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxalign.data import (
    DataError,
    JsonlSource,
    RowSource,
    ShardedSource,
    make_pair_pipeline,
    open_source,
    parse_pair,
)


def _records(n: int) -> list[dict]:
    """UltraFeedback-style pairs: the chosen / rejected conversations repeat the prompt turn."""
    out = []
    for i in range(n):
        prompt = f"What is {10 + i}-{i % 10}?"
        user = {"content": prompt, "role": "user"}
        out.append(
            {
                "prompt": prompt,
                "chosen": [user, {"content": str(10 + i - i % 10), "role": "assistant"}],
                "rejected": [user, {"content": str(11 + i - i % 10), "role": "assistant"}],
                "margin": float(i),
                "system": "Be brief." if i % 7 == 3 else None,
            }
        )
    return out


def _jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n")
    return str(path)


def _parquet(path, records) -> str:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=7)
    return str(path)


def _arrow_stream(path, records) -> pa.Table:
    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=5):
            writer.write_batch(batch)
    return table


def _datasets_dir(path, records, shards=2) -> str:
    """A directory laid out as `datasets.Dataset.save_to_disk` writes it: Arrow stream files
    listed in state.json."""
    path.mkdir()
    names = [f"data-{k:05d}-of-{shards:05d}.arrow" for k in range(shards)]
    step = -(-len(records) // shards)
    for k, name in enumerate(names):
        _arrow_stream(path / name, records[k * step : (k + 1) * step])
    (path / "dataset_info.json").write_text("{}")
    (path / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": n} for n in names], "_split": None})
    )
    return str(path)


def _array_record(path, records) -> str:
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(json.dumps(r).encode())
    writer.close()
    return str(path)


def _all_kinds(tmp_path, records) -> dict[str, str]:
    """The same records as JSONL, Parquet, Arrow, a datasets directory, ArrayRecord, a directory of
    JSONL shards and a glob of Parquet shards."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        _jsonl(shards / f"part-{k}.jsonl", records[k * 9 : (k + 1) * 9])
    (shards / "README.md").write_text("not data")
    nested = tmp_path / "nested"
    for k in range(3):
        (nested / f"c{k}").mkdir(parents=True)
        _parquet(nested / f"c{k}" / "train.parquet", records[k * 9 : (k + 1) * 9])
    (nested / "c0" / "old").mkdir()  # deeper than the pattern "c*/*": not matched
    _parquet(nested / "c0" / "old" / "train.parquet", records[:1])
    arrow = tmp_path / "data.arrow"
    _arrow_stream(arrow, records)
    return {
        "jsonl": _jsonl(tmp_path / "data.jsonl", records),
        "parquet": _parquet(tmp_path / "data.parquet", records),
        "arrow": str(arrow),
        "datasets": _datasets_dir(tmp_path / "saved", records),
        "array_record": _array_record(tmp_path / "data.array_record-00000-of-00001", records),
        "jsonl shards": str(shards),
        "parquet glob": str(nested / "c*" / "*"),
        "file uri": "file://" + _parquet(tmp_path / "uri.parquet", records),
    }


def _parse(rec):
    return parse_pair(rec, extra_fields=("margin",))


def test_every_kind_gives_the_same_records(tmp_path):
    records = _records(26)
    want = [_parse(r) for r in records]
    paths = _all_kinds(tmp_path, records)
    for kind, path in paths.items():
        source = open_source(path, _parse)
        assert len(source) == 26, kind
        got = [source[i] for i in range(len(source))]
        assert got == want, kind
        assert got[3]["system"] == "Be brief." and got[3]["messages"] == [
            {"role": "user", "content": "What is 13-3?"}
        ]
        expected_type = {
            "jsonl": JsonlSource,
            "jsonl shards": ShardedSource,
            "parquet glob": ShardedSource,
            "datasets": ShardedSource,
        }.get(kind, RowSource)
        assert type(source) is expected_type, kind
    shards = open_source(paths["jsonl shards"], _parse).shards  # README.md is not a shard
    assert [s.path for s in shards] == [f"{paths['jsonl shards']}/part-{k}.jsonl" for k in range(3)]


def _batches(path, n, **options):
    it = make_pair_pipeline(
        path, _tokenizer(), batch_size=4, max_len=32, extra_fields=("margin",), **options
    )
    return it, [next(it) for _ in range(n)]


def _tokenizer():
    from jaxalign.data import load_tokenizer

    here = os.path.dirname(__file__)
    return load_tokenizer(os.path.join(here, "..", "..", "data", "demo", "tokenizer.model"))


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_pipelines_give_the_same_batches_from_every_kind(tmp_path):
    """Shuffled over two epochs, per-host slices, and a state saved on JSONL resuming on
    Parquet: the batches do not depend on the file format."""
    paths = _all_kinds(tmp_path, _records(26))
    for options in ({"seed": 3}, {"seed": 1, "process_index": 1, "process_count": 2}):
        _, want = _batches(paths["jsonl"], 9, **options)  # 26 records: past the first epoch
        for path in paths.values():
            _assert_same(_batches(path, 9, **options)[1], want)
    jsonl, _ = _batches(paths["jsonl"], 3, seed=5)
    state = json.loads(json.dumps(jsonl.get_state()))
    rest = [next(jsonl) for _ in range(4)]
    parquet, _ = _batches(paths["parquet"], 0, seed=5)
    parquet.set_state(state)
    _assert_same([next(parquet) for _ in range(4)], rest)


def test_bad_rows_are_named_by_file_and_row(tmp_path):
    records = _records(6)
    bad = records[:2] + [dict(records[2], rejected=None)] + records[3:]
    path = _parquet(tmp_path / "bad.parquet", bad)
    with pytest.raises(DataError) as e:
        open_source(path, _parse)
    assert str(e.value) == (
        f'{path} row 2: field "rejected" is missing (expected a string or a list of messages)'
    )
    source = open_source(path, _parse, skip_bad_records=True)
    assert len(source) == 5 and source.num_bad_records == 1
    assert source.bad_record_messages == [str(e.value)]
    assert source[2] == _parse(records[3])
    # in a set of shards the message names the shard
    shards = tmp_path / "shards"
    shards.mkdir()
    _parquet(shards / "a.parquet", records)
    _parquet(shards / "b.parquet", bad)
    with pytest.raises(DataError, match=rf"^{shards}/b.parquet row 2: field \"rejected\""):
        open_source(str(shards), _parse)
    sharded = open_source(str(shards), _parse, skip_bad_records=True)
    assert (len(sharded), sharded.num_bad_records) == (11, 1)
    # ArrayRecord records are JSON objects
    from array_record.python.array_record_module import ArrayRecordWriter

    ar = str(tmp_path / "bad.array_record")
    writer = ArrayRecordWriter(ar, "group_size:1")
    for raw in (json.dumps(records[0]).encode(), b'{"prompt": ', b"[1, 2]", b"\xff"):
        writer.write(raw)
    writer.close()
    with pytest.raises(DataError, match=rf"^{ar} row 1: bad JSON \("):
        open_source(ar, _parse)
    source = open_source(ar, _parse, skip_bad_records=True)
    assert len(source) == 1 and source.num_bad_records == 3
    assert source.bad_record_messages[1] == f"{ar} row 2: expected a JSON object, got list"
    assert source.bad_record_messages[2].startswith(f"{ar} row 3: not UTF-8")


def test_paths_that_are_not_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    cases = {
        str(empty): f"{empty}: is a directory with no data files",
        str(tmp_path / "none" / "*.parquet"): "matches no files",
        str(tmp_path / "missing.parquet"): f"{tmp_path}/missing.parquet: file not found",
        _jsonl(tmp_path / "empty.jsonl", []): "empty.jsonl: no records (empty)",
    }
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet")
    cases[str(garbage)] = f"{garbage}: cannot read as parquet ("
    arrow = tmp_path / "garbage.arrow"
    arrow.write_text("not arrow")
    cases[str(arrow)] = f"{arrow}: cannot read as arrow ("
    splits = tmp_path / "dict"
    splits.mkdir()
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    cases[str(splits)] = (
        f"{splits}: is a datasets DatasetDict (splits: train, test); give one split's "
        f"directory, e.g. {splits}/train"
    )
    cases["file://" + _jsonl(tmp_path / "remote.jsonl", _records(2))] = (
        "JSONL is read from local files only"
    )
    for path, message in cases.items():
        with pytest.raises(DataError) as e:
            open_source(path, _parse)
        assert message in str(e.value) and "\n" not in str(e.value), (path, str(e.value))


def test_relative_globs_and_paths(tmp_path, monkeypatch):
    records = _records(6)
    _parquet(tmp_path / "a-0.parquet", records[:3])
    _parquet(tmp_path / "a-1.parquet", records[3:])
    monkeypatch.chdir(tmp_path)
    source = open_source("a-*.parquet", _parse)
    assert [s.path for s in source.shards] == ["a-0.parquet", "a-1.parquet"]
    assert [source[i] for i in range(6)] == [_parse(r) for r in records]
    assert open_source("./", _parse).path == "./" and len(open_source(".", _parse)) == 6


def test_sources_pickle_without_their_data(tmp_path):
    paths = _all_kinds(tmp_path, _records(10))
    for kind in ("parquet", "datasets", "array_record", "arrow"):
        source = open_source(paths[kind], _parse)
        first = source[4]
        blob = pickle.dumps(source)
        assert len(blob) < 4000, kind  # offsets only: the table is reopened where it is used
        assert pickle.loads(blob)[4] == first


@pytest.mark.hf
def test_datasets_save_to_disk(tmp_path):
    import datasets

    records = _records(12)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"), num_shards=3)
    source = open_source(str(tmp_path / "ds"), _parse)
    assert [source[i] for i in range(12)] == [_parse(r) for r in records]
    assert len(source.shards) == 3
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(records), "test": datasets.Dataset.from_list([])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="is a datasets DatasetDict"):
        open_source(str(tmp_path / "dd"), _parse)
    assert len(open_source(str(tmp_path / "dd" / "train"), _parse)) == 12
