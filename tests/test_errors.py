"""Bad input of every kind gives one line `jaxalign: ...` with status 2, naming the file, record,
key or tensor, and writes or damages nothing. Table-driven through the CLI entry point."""

import json
import pathlib

import pytest

from jaxalign import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
SFT = str(ROOT / "configs/sft/tiny.py")
DPO = str(ROOT / "configs/dpo/tiny.py")
TOKENIZER = str(ROOT / "data/demo/tokenizer.model")


def _main(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    err = capsys.readouterr().err
    return exit_info.value.code, err


def _train(capsys, workdir, *overrides, config=f"{SFT}:smoke=True"):
    args = ["train", "--config", config, "--workdir", str(workdir)]
    return _main(capsys, *args, f"--config.tokenizer={TOKENIZER}", *overrides)


def _one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("jaxalign: "), err
    assert "Traceback" not in err
    return lines[0]


def _write(path: pathlib.Path, lines) -> str:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def _bad_data(tmp_path, kind):
    if kind == "empty":
        path = tmp_path / "empty.jsonl"
        path.write_text("")
        return str(path), [f"--config.data.train={path}"], f"{path}: no records (empty)"
    if kind == "all skipped":
        path = _write(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"completion": "b"}])
        overrides = [f"--config.data.train={path}", "--config.data.skip_bad_records=True"]
        return path, overrides, "no records (all 2 malformed, skipped)"
    path = tmp_path / "adir"
    path.mkdir()
    return str(path), [f"--config.data.train={path}"], f"{path}: is a directory"


@pytest.mark.parametrize("kind", ["empty", "all skipped", "directory"])
def test_unusable_data_files(capsys, tmp_path, kind):
    _, overrides, message = _bad_data(tmp_path, kind)
    workdir = tmp_path / "run"
    code, err = _train(capsys, workdir, *overrides, "--config.data.eval=")
    assert code == 2 and message in _one_line(err)
    # A failed start leaves no checkpoints directory and records no config.
    assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()


def test_workdir_that_is_a_file(capsys, tmp_path):
    workdir = tmp_path / "file"
    workdir.write_text("keep me")
    code, err = _train(capsys, workdir)
    assert code == 2 and f"workdir {workdir}: is a file" in _one_line(err)
    assert workdir.read_text() == "keep me"


def test_workdir_that_is_not_writable(capsys):
    """/proc exists, is a directory, and takes no new files, not even from root."""
    code, err = _train(capsys, "/proc")
    assert code == 2 and "workdir /proc: is not writable" in _one_line(err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", f"{SFT}:steps=abc"], 'config argument "steps=abc": expected int for "steps"'),
        (
            ["--config", f"{SFT}:smoke=True", "--config.model.preset=tiny-99"],
            'model.preset "tiny-99" is unknown (known: ',
        ),
        (
            ["--config", f"{DPO}:smoke=True", "--config.loss.name=dpoo"],
            "unknown loss 'dpoo' (did you mean 'dpo'?)",
        ),
        (
            ["--config", f"{SFT}:smoke=True", "--config.trainer=pairs"],
            'trainer "pairs" is unknown (did you mean "paired"?)',
        ),
        (
            ["--config", f"{SFT}:smoke=True", "--config.optimizer.learning_rate=1"],
            'unknown key "optimizer.learning_rate" (did you mean "optimizer.lr"?)',
        ),
    ],
    ids=["config-argument", "preset", "loss", "trainer", "key"],
)
def test_config_mistakes(capsys, tmp_path, argv, message):
    workdir = tmp_path / "run"
    code, err = _main(
        capsys, "train", "--workdir", str(workdir), *argv, f"--config.tokenizer={TOKENIZER}"
    )
    line = _one_line(err)
    assert code == 2 and message in line and line.count("jaxalign:") == 1
    assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--config", SFT], "train needs --workdir"),
        (["cache-ref", "--config", SFT], "cache-ref needs --out or --workdir"),
        (["convert", "to-hf", "--out", "x"], "convert to-hf needs --checkpoint"),
        (
            ["train", "--config", SFT, "--workdir", "w", "--config.steps"],
            "--config.steps needs a value",
        ),
        (["trian"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    code, err = _main(capsys, *argv)
    assert code == 2 and message in err


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A finished 4-step SFT run of tiny-64."""
    workdir = tmp_path_factory.mktemp("sft")
    argv = ["train", "--config", f"{SFT}:smoke=True", "--workdir", str(workdir)]
    cli.main([*argv, f"--config.tokenizer={TOKENIZER}"])  # returns: status 0
    return workdir


def _snapshot(workdir: pathlib.Path) -> dict:
    return {
        str(p.relative_to(workdir)): p.read_bytes()
        for p in sorted(workdir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_a_checkpoint_of_another_architecture_names_the_tensor(capsys, sft_run, tmp_path):
    before = _snapshot(sft_run)
    # eval with a config of another model
    code, err = _main(
        capsys,
        "eval",
        "--workdir",
        str(sft_run),
        "--config",
        f"{SFT}:smoke=True",
        f"--config.tokenizer={TOKENIZER}",
        "--config.model.preset=tiny-qwen2",
    )
    assert err.startswith("jaxalign: --config differs from the run in model.preset")
    line = _one_line(err.split("\n", 1)[1])
    assert code == 2 and "params/" in line
    assert "has shape" in line or "holds no tensor" in line
    # resume with another model (the change accepted explicitly)
    code, err = _train(
        capsys,
        sft_run,
        "--config.model.preset=tiny-qwen2",
        "--config.steps=6",
        "--allow_config_change",
    )
    assert code == 2 and "is it a checkpoint of this architecture?" in err
    assert _snapshot(sft_run) == before  # nothing written or damaged
