"""Pipelines: layout, determinism, resume, packing, padding, bad records, host slices."""

import dataclasses
import json

import numpy as np
import pytest

from jaxalign.data import (
    DataError,
    make_pair_pipeline,
    make_prompt_pipeline,
    make_reward_augment,
    make_sft_pipeline,
    make_unpaired_pipeline,
    reward_augment,
)

KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids", "seq_index", "example_mask")


def _sft_records(n):
    return [
        {"prompt": f"What is {10 + i}+{20 + 3 * i % 50}?", "completion": str(i * 7 % 97)}
        for i in range(n)
    ]


def _pair_records(n):
    return [
        {
            "prompt": f"What is {10 + i}-{i % 10}?",
            "chosen": str(10 + i - i % 10),
            "rejected": str(11 + i - i % 10) + "0" * (i % 4),
            "margin": float(i),
        }
        for i in range(n)
    ]


def _sequences(batch, n_seq):
    """Per sequence slot: (full ids = inputs + last target, loss-masked targets) recovered from a
    batch.
    """
    out = {}
    for s in range(n_seq):
        sel = batch["seq_index"] == s
        if not sel.any():
            continue
        rows = np.nonzero(sel.any(axis=1))[0]
        assert len(rows) == 1, "a sequence must sit in a single row"
        r = rows[0]
        cols = np.nonzero(sel[r])[0]
        assert (np.diff(cols) == 1).all(), "a sequence must be contiguous"
        assert batch["positions"][r, cols].tolist() == list(range(len(cols)))
        assert len(set(batch["segment_ids"][r, cols].tolist())) == 1
        toks, tgts = batch["tokens"][r, cols], batch["targets"][r, cols]
        assert (toks[1:] == tgts[:-1]).all()
        full = toks.tolist() + [int(tgts[-1])]
        resp = tgts[batch["loss_mask"][r, cols] > 0].tolist()
        out[s] = (full, resp)
    return out


def _expected(tok, prompt, response):
    p = [tok.bos_id] + tok.encode(prompt + "\n")
    r = tok.encode(response) + [tok.eos_id]
    return p + r, r


def test_sft_batch_layout_pad_mode(write_jsonl, demo_tokenizer):
    recs = _sft_records(10)
    path = write_jsonl("sft.jsonl", recs)
    it = make_sft_pipeline(
        path, demo_tokenizer, batch_size=4, max_len=64, shuffle=False, num_epochs=1
    )
    batches = list(it)
    assert len(batches) == 3
    for b in batches:
        assert set(b) == set(KEYS)
        R, T = b["tokens"].shape
        assert R == 4 and T in (16, 32, 64)
        assert b["example_mask"].shape == (4,)
        for k in KEYS[:6]:
            assert b[k].shape == (R, T)
        assert b["tokens"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
        pad = b["seq_index"] == -1
        assert (b["segment_ids"][pad] == 0).all() and (b["loss_mask"][pad] == 0).all()
        assert (b["segment_ids"][~pad] == 1).all()  # one sequence per row
        assert (b["seq_index"][~pad] == np.nonzero(~pad)[0]).all()  # row r = sequence r
    assert batches[-1]["example_mask"].tolist() == [1, 1, 0, 0]
    assert (batches[-1]["seq_index"][2:] == -1).all()
    got = [seq for b in batches for seq in _sequences(b, 4).values()]
    assert got == [_expected(demo_tokenizer, r["prompt"], r["completion"]) for r in recs]


def test_pair_layout_chosen_then_rejected(write_jsonl, demo_tokenizer):
    recs = _pair_records(6)
    path = write_jsonl("pairs.jsonl", recs)
    for pack in (False, True):
        it = make_pair_pipeline(
            path,
            demo_tokenizer,
            batch_size=4,
            max_len=32,
            shuffle=False,
            pack=pack,
            num_epochs=1,
            extra_fields=("margin",),
        )
        b = next(it)
        assert b["example_mask"].shape == (4,) and b["margin"].tolist() == [0, 1, 2, 3]
        seqs = _sequences(b, 8)
        for i, r in enumerate(recs[: int(b["example_mask"].sum())]):
            assert seqs[i] == _expected(demo_tokenizer, r["prompt"], r["chosen"])
            assert seqs[4 + i] == _expected(demo_tokenizer, r["prompt"], r["rejected"])
        if not pack:
            assert b["tokens"].shape[0] == 8


def test_packing_correctness_no_token_lost(write_jsonl, demo_tokenizer):
    recs = _sft_records(37)
    path = write_jsonl("sft.jsonl", recs)
    it = make_sft_pipeline(
        path, demo_tokenizer, batch_size=8, max_len=40, pack=True, pack_rows=2, seed=3, num_epochs=1
    )
    got, n_batches = [], 0
    for b in it:
        n_batches += 1
        assert b["tokens"].shape == (2, 40)  # the same shape for every packed batch
        n = int(b["example_mask"].sum())
        seqs = _sequences(b, 8)
        assert sorted(seqs) == list(range(n))  # slots 0..n-1 used, in order
        assert b["example_mask"][:n].all() and not b["example_mask"][n:].any()
        for r in range(2):  # segments 1, 2, ... from the row start, then padding
            seg = b["segment_ids"][r]
            used = seg > 0
            assert (used[: used.sum()]).all()
            assert (np.diff(seg[used]) >= 0).all() and (seg[used][0] == 1 if used.any() else True)
        assert (b["loss_mask"][b["segment_ids"] == 0] == 0).all()
        got.extend(seqs[s] for s in sorted(seqs))
    want = [_expected(demo_tokenizer, r["prompt"], r["completion"]) for r in recs]
    assert sorted(got) == sorted(want)  # every example exactly once, every token kept
    assert n_batches < 37 / 2  # it did pack


def test_pad_mode_length_buckets(write_jsonl, demo_tokenizer):
    path = write_jsonl("sft.jsonl", _sft_records(8))
    it = make_sft_pipeline(
        path, demo_tokenizer, batch_size=2, max_len=100, length_buckets=(8, 24), shuffle=False
    )
    b = next(it)
    longest = int((b["seq_index"] >= 0).sum(axis=1).max())
    assert b["tokens"].shape == (2, 24) and 8 < longest <= 24
    it = make_sft_pipeline(path, demo_tokenizer, batch_size=2, max_len=100, process_count=2)
    assert next(it)["tokens"].shape == (2, 100)  # multi-host: one fixed length unless buckets given


def test_determinism_and_seed(write_jsonl, demo_tokenizer):
    path = write_jsonl("pairs.jsonl", _pair_records(40))

    def first_batches(seed, n=6):
        it = make_pair_pipeline(path, demo_tokenizer, batch_size=4, max_len=32, seed=seed)
        return [next(it)["tokens"] for _ in range(n)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_epochs_reshuffle_and_cover(write_jsonl, demo_tokenizer):
    recs = _sft_records(12)
    path = write_jsonl("sft.jsonl", recs)
    it = make_sft_pipeline(path, demo_tokenizer, batch_size=4, max_len=64, seed=0, num_epochs=2)
    epochs = [[], []]
    for k, b in enumerate(it):
        epochs[k // 3].extend(s[0] for s in _sequences(b, 4).values())
    want = sorted(_expected(demo_tokenizer, r["prompt"], r["completion"])[0] for r in recs)
    assert sorted(epochs[0]) == sorted(epochs[1]) == want
    assert epochs[0] != epochs[1]  # a new permutation each epoch


@pytest.mark.parametrize("pack", [False, True])
def test_resume_gives_identical_batches(write_jsonl, demo_tokenizer, pack):
    path = write_jsonl("pairs.jsonl", _pair_records(30))

    def make():
        return make_pair_pipeline(
            path, demo_tokenizer, batch_size=4, max_len=32, seed=5, pack=pack, pack_rows=3
        )

    it = make()
    for _ in range(9):  # past the end of the first epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    fresh = make()
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    other = make_pair_pipeline(
        path, demo_tokenizer, batch_size=4, max_len=32, seed=6, pack=pack, pack_rows=3
    )
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


def test_bad_records_name_file_line_field(write_jsonl, demo_tokenizer):
    good = {"prompt": "What is 1+2?", "chosen": "3", "rejected": "4"}
    lines = [good, good, {"prompt": "What is 1+2?", "chosen": "3"}, good]
    path = write_jsonl("pairs.jsonl", lines)
    with pytest.raises(DataError) as e:
        make_pair_pipeline(path, demo_tokenizer, batch_size=2, max_len=32)
    assert str(e.value) == (
        f'{path} line 3: field "rejected" is missing (expected a string or a list of messages)'
    )
    path = write_jsonl("bad_json.jsonl", [good, '{"prompt": "x", ', good])
    with pytest.raises(DataError, match=r"bad_json.jsonl line 2: bad JSON"):
        make_pair_pipeline(path, demo_tokenizer, batch_size=2, max_len=32)
    path = write_jsonl("bad_type.jsonl", [good, "", dict(good, chosen=["x"])])
    with pytest.raises(DataError, match=r'bad_type.jsonl line 3: field "chosen\[0\]" has type str'):
        make_pair_pipeline(path, demo_tokenizer, batch_size=2, max_len=32)
    path = write_jsonl("empty.jsonl", [dict(good, rejected="")])
    with pytest.raises(DataError, match=r'empty.jsonl line 1: field "rejected" is empty'):
        make_pair_pipeline(path, demo_tokenizer, batch_size=2, max_len=32)


def test_skip_bad_records_counts(write_jsonl, demo_tokenizer):
    good = {"prompt": "What is 1+2?", "completion": "3", "label": True}
    lines = [
        good,
        "not json",
        dict(good, label="yes"),
        good,
        [1, 2],
        dict(good, completion=""),
        good,
    ]
    path = write_jsonl(
        "unpaired.jsonl", [json.dumps(x) if isinstance(x, list) else x for x in lines]
    )
    it = make_unpaired_pipeline(
        path, demo_tokenizer, batch_size=8, max_len=32, skip_bad_records=True, num_epochs=1
    )
    assert it.num_bad_records == 4
    assert 'line 3: field "label" has type str' in it.source.bad_record_messages[1]
    b = next(it)
    assert b["example_mask"].sum() == 3 and b["labels"][:3].tolist() == [1.0, 1.0, 1.0]


def test_unpaired_labels(write_jsonl, demo_tokenizer):
    recs = [
        {"prompt": f"What is {i}+1?", "completion": str(i), "label": i % 3 == 0} for i in range(7)
    ]
    path = write_jsonl("u.jsonl", recs)
    b = next(
        make_unpaired_pipeline(
            path, demo_tokenizer, batch_size=8, max_len=32, shuffle=False, num_epochs=1
        )
    )
    assert b["labels"].tolist() == [1, 0, 0, 1, 0, 0, 1, 0]
    assert b["example_mask"].tolist() == [1] * 7 + [0]
    assert b["tokens"].shape[0] == 8


def test_host_slices_disjoint_and_cover(write_jsonl, demo_tokenizer):
    recs = _sft_records(24)
    path = write_jsonl("sft.jsonl", recs)
    seen = []
    for host in range(3):
        it = make_sft_pipeline(
            path,
            demo_tokenizer,
            batch_size=4,
            max_len=64,
            seed=0,
            process_index=host,
            process_count=3,
            num_epochs=1,
        )
        assert it.num_examples == 8
        seen.append({tuple(s[0]) for b in it for s in _sequences(b, 4).values()})
    assert sum(len(s) for s in seen) == 24
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    want = {tuple(_expected(demo_tokenizer, r["prompt"], r["completion"])[0]) for r in recs}
    assert set().union(*seen) == want


def test_system_and_chat_messages(write_jsonl, demo_tokenizer):
    recs = [
        {
            "system": "Be brief.",
            "messages": [
                {"role": "user", "content": "What is 1+2?"},
                {"role": "assistant", "content": "3"},
            ],
        }
    ]
    path = write_jsonl("chat.jsonl", recs)
    b = next(make_sft_pipeline(path, demo_tokenizer, batch_size=1, max_len=64))
    full, resp = _sequences(b, 1)[0]
    tok = demo_tokenizer
    assert full == [tok.bos_id] + tok.encode("Be brief.\n\nWhat is 1+2?\n") + tok.encode("3") + [
        tok.eos_id
    ]
    assert resp == tok.encode("3") + [tok.eos_id]


def test_reward_augment():
    rec = {
        "prompt": "P",
        "chosen": "A",
        "rejected": "B",
        "score_chosen": 8,
        "score_rejected": 3.5,
        "system": "S",
    }
    a, b = reward_augment(rec)
    assert a == {
        "prompt": "P",
        "chosen": "A",
        "rejected": "B",
        "system": "S\n\nGenerate a response with a score of 8.",
    }
    assert b == {
        "prompt": "P",
        "chosen": "B",
        "rejected": "A",
        "system": "S\n\nGenerate a response with a score of 3.5.",
    }
    assert len(reward_augment(dict(rec, score_rejected=8))) == 1  # a tie: no flipped pair


def test_reward_augment_in_pipeline(write_jsonl, demo_tokenizer):
    recs = [
        {
            "prompt": f"What is {i}+1?",
            "chosen": str(i + 1),
            "rejected": str(i),
            "s_w": 1.0,
            "s_l": 0.0,
        }
        for i in range(5)
    ]
    path = write_jsonl("p.jsonl", recs + ['{"prompt": "x", "chosen": "a", "rejected": "b"}'])
    aug = make_reward_augment(
        chosen_score_field="s_w", rejected_score_field="s_l", system_format="score {score:g}"
    )
    with pytest.raises(DataError, match='line 6: field "s_w" is missing'):
        make_pair_pipeline(path, demo_tokenizer, batch_size=2, max_len=64, transforms=[aug])
    it = make_pair_pipeline(
        path,
        demo_tokenizer,
        batch_size=10,
        max_len=64,
        transforms=[aug],
        shuffle=False,
        skip_bad_records=True,
    )
    assert it.num_examples == 10 and it.num_bad_records == 1
    seqs = _sequences(next(it), 20)
    tok = demo_tokenizer
    chosen_0 = (
        [tok.bos_id] + tok.encode("score 1\n\nWhat is 0+1?\n") + tok.encode("1") + [tok.eos_id]
    )
    chosen_1 = (
        [tok.bos_id] + tok.encode("score 0\n\nWhat is 0+1?\n") + tok.encode("0") + [tok.eos_id]
    )
    assert seqs[0][0] == chosen_0 and seqs[1][0] == chosen_1


def test_prompt_pipeline_left_padded(write_jsonl, demo_tokenizer):
    recs = [
        {"prompt": "What is 1+2?", "answer": "3"},
        {"prompt": "Hi", "answer": "x"},
        {"prompt": "What is 10+20?", "answer": "30", "system": "Be brief."},
    ]
    path = write_jsonl("prompts.jsonl", recs)
    it = make_prompt_pipeline(
        path, demo_tokenizer, batch_size=2, max_prompt_len=64, shuffle=False, num_epochs=1
    )
    tok = demo_tokenizer
    b1, b2 = list(it)
    assert b1["records"] == recs[:2] and b2["records"] == [recs[2], None]
    assert b2["example_mask"].tolist() == [1, 0]
    want = [tok.bos_id] + tok.encode("Be brief.\n\nWhat is 10+20?\n")
    Tp = b2["prompt_tokens"].shape[1]
    assert Tp in (16, 32, 64) and b2["prompt_lengths"].tolist() == [len(want), 0]
    assert b2["prompt_tokens"][0, Tp - len(want) :].tolist() == want  # prompt ends at column Tp - 1
    assert b2["prompt_positions"][0, Tp - len(want) :].tolist() == list(range(len(want)))
    assert b2["prompt_segment_ids"][0].sum() == len(want) and b2["prompt_segment_ids"][1].sum() == 0
    hi = [tok.bos_id] + tok.encode("Hi\n")
    assert b1["prompt_tokens"][1, -len(hi) :].tolist() == hi
    it2 = make_prompt_pipeline(
        path, demo_tokenizer, batch_size=2, max_prompt_len=64, shuffle=False, num_epochs=1
    )
    it2.set_state({"next_index": 2, "fingerprint": it.fingerprint})
    np.testing.assert_array_equal(next(it2)["prompt_tokens"], b2["prompt_tokens"])


def test_source_and_tokenizer_pickle(write_jsonl, demo_dir):
    """Sources and tokenizers travel to worker processes (Grain multiprocessing) by pickling."""
    import pickle

    from jaxalign.data import JsonlSource, load_tokenizer, parse_sft

    path = write_jsonl("sft.jsonl", _sft_records(3))
    src = JsonlSource(path, parse_sft)
    first = src[0]
    again = pickle.loads(pickle.dumps(src))
    assert len(again) == 3 and again[0] == first
    tok = pickle.loads(pickle.dumps(load_tokenizer(str(demo_dir / "tokenizer.model"))))
    assert tok.decode(tok.encode("What is 1+2?")) == "What is 1+2?"


def test_prefetch_matches_and_resumes(write_jsonl, demo_tokenizer):
    from jaxalign.data import Prefetch

    path = write_jsonl("pairs.jsonl", _pair_records(20))

    def make():
        return make_pair_pipeline(
            path, demo_tokenizer, batch_size=3, max_len=32, seed=2, num_epochs=2
        )

    want = list(make())
    pf = Prefetch(make(), buffer_size=3)
    got = [next(pf) for _ in range(4)]
    state = pf.get_state()  # after the 4th returned batch, although more were built
    got += list(pf)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g["tokens"], w["tokens"])
    with pytest.raises(StopIteration):
        next(pf)
    pf.set_state(state)
    np.testing.assert_array_equal(next(pf)["tokens"], want[4]["tokens"])
    pf.close()
    resumed = make()
    resumed.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(resumed)["tokens"], want[4]["tokens"])


@pytest.mark.parametrize("bos", [True, False])
def test_prompt_pipeline_cuts_from_the_left(write_jsonl, demo_tokenizer, bos):
    """A long prompt keeps its last tokens (and BOS when the template does not write its own, as a
    tokenizer chat template without bos_token), and is counted as truncated."""
    from jaxalign.data import TEMPLATES

    template = dataclasses.replace(TEMPLATES["plain"], bos=bos)
    recs = [{"prompt": "What is 1+2? " * 8}, {"prompt": "Hi"}]
    path = write_jsonl("prompts.jsonl", recs)
    it = make_prompt_pipeline(
        path,
        demo_tokenizer,
        batch_size=2,
        max_prompt_len=8,
        template=template,
        shuffle=False,
        num_epochs=1,
    )
    batch = next(it)
    tok = demo_tokenizer
    head = [tok.bos_id] if bos else []
    for row, rec in enumerate(recs):
        body = tok.encode(rec["prompt"] + "\n")
        want = head + body[-(8 - len(head)) :]  # the whole prompt when it fits
        assert batch["prompt_tokens"][row, -len(want) :].tolist() == want
        assert batch["prompt_lengths"][row] == len(want)
    assert it.num_truncated == 1
