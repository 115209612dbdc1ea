"""The demo task: deterministic generator, judge, bundled files and tokenizer."""

import json

from jaxalign.data import demo_task, load_tokenizer


def test_judge(demo_dir):
    assert demo_task.judge("What is 23+58?", "81") == 1.0
    assert demo_task.judge("What is 23+58?", " 81.") == 1.0
    assert demo_task.judge("What is 71-19?", "52") == 1.0
    for wrong in ("82", "80", "91", "18", "", "eighty-one", "81 or 82"):
        assert demo_task.judge("What is 23+58?", wrong) == 0.0


def test_near_miss_is_close_and_wrong(demo_dir):
    import random

    rng = random.Random(0)
    for ans in (0, 5, 10, 81, 99, 118, 198):
        for _ in range(20):
            m = demo_task.near_miss(ans, rng)
            swapped = int(str(ans)[:-2] + str(ans)[-1] + str(ans)[-2]) if ans >= 10 else None
            assert m != ans and m >= 0
            assert abs(m - ans) in (1, 10) or m == swapped


def test_generator_deterministic_and_splits_disjoint(demo_dir):
    a = demo_task.generate_demo_records(seed=0)
    assert a == demo_task.generate_demo_records(seed=0)
    assert a != demo_task.generate_demo_records(seed=1)
    train = {r["prompt"] for s in ("sft_train", "pairs_train", "unpaired_train") for r in a[s]}
    evals = {r["prompt"] for s in ("pairs_eval", "prompts_eval") for r in a[s]}
    assert not train & evals
    for r in a["pairs_train"]:
        assert demo_task.judge(r["prompt"], r["chosen"]) == 1.0
        assert demo_task.judge(r["prompt"], r["rejected"]) == 0.0
    for r in a["unpaired_train"]:
        assert demo_task.judge(r["prompt"], r["completion"]) == float(r["label"])


def test_bundled_files_match_generator(demo_dir):
    recs = demo_task.generate_demo_records(seed=0)
    total = 0
    for split, expected in recs.items():
        path = demo_dir / f"{split}.jsonl"
        got = [json.loads(line) for line in path.read_text().splitlines()]
        assert got == expected, f"{path} is stale: run python tools/make_demo_data.py"
        total += path.stat().st_size
    total += (demo_dir / "tokenizer.model").stat().st_size + (
        demo_dir / "corpus.txt"
    ).stat().st_size
    assert total < 2_000_000


def test_demo_tokenizer(tmp_path, demo_dir):
    tok = load_tokenizer(str(demo_dir / "tokenizer.model"))
    assert tok.vocab_size <= 512
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    text = "What is 23+58?\n"
    assert tok.decode(tok.encode(text)) == text
    # regenerating the tokenizer from the bundled corpus gives the same model (deterministic)
    demo_task.train_sentencepiece(str(demo_dir / "corpus.txt"), str(tmp_path / "t.model"))
    again = load_tokenizer(str(tmp_path / "t.model"))  # the proto also records the input path
    pieces = [tok._sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert [again._sp.id_to_piece(i) for i in range(again.vocab_size)] == pieces
