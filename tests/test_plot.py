"""`jaxalign plot`: the panels, the overlaid and labelled runs (train solid, eval dashed), the PNG
written whole, and one-line errors for missing or empty metrics."""

import json
import os
import pathlib

import pytest

from jaxalign import cli
from jaxalign.errors import ConfigError, DataError
from jaxalign.plot import draw, panels, plot_runs, read_metrics


def _run(directory: pathlib.Path, scale: float, kl: bool = False) -> pathlib.Path:
    directory.mkdir(parents=True)
    records = [{"step": 0, "split": "eval", "loss": 0.7 * scale, "rewards/accuracy": 0.0}]
    for step in (2, 4, 6):
        record = {"step": step, "split": "train", "loss": scale / step, "learning_rate": 1e-4}
        record |= {"rewards/margin": step * scale, "rewards/accuracy": 0.5, "grad_norm": 1.0}
        if kl:
            record |= {"kl": 0.01 * step, "policy/kl_coef": 0.1}
        records.append(record)
    records.append({"step": 6, "split": "eval", "loss": 0.4 * scale, "rewards/accuracy": 0.75})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def test_panels_and_curves(tmp_path):
    runs = {
        "a": read_metrics(str(_run(tmp_path / "a", 1.0, kl=True))),
        "b": read_metrics(str(_run(tmp_path / "b", 2.0))),
    }
    names = ["loss", "rewards/margin", "rewards/accuracy", "kl", "policy/kl_coef", "learning_rate"]
    assert panels(runs) == names  # grad_norm has no panel
    fig = draw(runs)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == names
    lines = {(ax.get_title(), line.get_label()): line for ax in axes for line in ax.get_lines()}
    loss_b = lines[("loss", "b")]
    assert list(loss_b.get_xdata()) == [2, 4, 6] and list(loss_b.get_ydata()) == [1.0, 0.5, 2 / 6]
    assert loss_b.get_linestyle() == "-"
    eval_b = lines[("loss", "b (eval)")]
    assert list(eval_b.get_xdata()) == [0, 6] and list(eval_b.get_ydata()) == [1.4, 0.8]
    assert eval_b.get_linestyle() == "--" and eval_b.get_marker() == "o"
    assert lines[("loss", "a")].get_color() != loss_b.get_color()  # a colour per run
    assert loss_b.get_color() == eval_b.get_color()
    assert {label for title, label in lines if title == "kl"} == {"a"}
    assert [label for title, label in lines if title == "rewards/accuracy"] == [
        "a",
        "a (eval)",
        "b",
        "b (eval)",
    ]


def test_online_runs_get_reward_panels(tmp_path):
    """An online run's mean reward (train) and its greedy / sampled eval rewards get panels, and
    sit beside a DPO run's panels when both are drawn."""
    online = tmp_path / "grpo"
    online.mkdir()
    records = [{"step": 0, "split": "eval", "reward/greedy": 0.1, "reward/sampled": 0.2}]
    records += [{"step": s, "split": "train", "reward": 0.1 * s, "kl": 0.01 * s} for s in (1, 2)]
    records.append({"step": 2, "split": "eval", "reward/greedy": 0.5, "reward/sampled": 0.4})
    (online / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = {"grpo": read_metrics(str(online))}
    assert panels(runs) == ["reward", "reward/sampled", "reward/greedy", "kl"]
    runs["dpo"] = read_metrics(str(_run(tmp_path / "dpo", 1.0)))
    assert panels(runs) == [
        "loss",
        "reward",
        "reward/sampled",
        "reward/greedy",
        "rewards/margin",
        "rewards/accuracy",
        "kl",
        "learning_rate",
    ]
    lines = {(ax.get_title(), ln.get_label()): ln for ax in draw(runs).axes for ln in ax.lines}
    greedy = lines[("reward/greedy", "grpo (eval)")]
    assert list(greedy.get_xdata()) == [0, 2] and list(greedy.get_ydata()) == [0.1, 0.5]
    assert list(lines[("reward", "grpo")].get_ydata()) == [0.1, 0.2]


def test_plot_writes_a_whole_png(tmp_path, capsys):
    a, b = _run(tmp_path / "x" / "dpo", 1.0), _run(tmp_path / "y" / "dpo", 2.0)
    out = tmp_path / "plots" / "curves.png"
    cli.main(["plot", str(a), str(b / "metrics.jsonl"), "--out", str(out)])
    assert capsys.readouterr().out.strip() == (
        f"wrote {out} (loss, rewards/margin, rewards/accuracy, learning_rate)"
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(out.parent) == ["curves.png"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    fig = draw({"x": read_metrics(str(a))})
    assert fig.axes[0].get_lines()[0].get_label() == "x"
    # runs with the same directory name are labelled by their paths
    from jaxalign.plot import _labels

    assert _labels([str(a), str(b / "metrics.jsonl")]) == [str(a), str(b / "metrics.jsonl")]
    assert _labels([str(a)]) == ["dpo"]


def test_bad_runs_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    torn = _run(tmp_path / "torn", 1.0)
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "split": "tr')  # killed mid-write: the last line is dropped
    assert [r["step"] for r in read_metrics(str(torn))][-1] == 6
    bad = _run(tmp_path / "bad", 1.0)
    text = (bad / "metrics.jsonl").read_text()
    (bad / "metrics.jsonl").write_text("not json\n" + text)
    no_panels = tmp_path / "sft_only"
    no_panels.mkdir()
    (no_panels / "metrics.jsonl").write_text('{"step": 1, "split": "train", "grad_norm": 1}\n')
    cases = [
        ([str(tmp_path / "nowhere")], f"{tmp_path}/nowhere: not found"),
        ([str(tmp_path / "out")], f"{tmp_path}/out: no metrics.jsonl (not a jaxalign run"),
        ([str(empty)], f"{empty}/metrics.jsonl: no metrics yet (empty)"),
        ([str(bad)], f"{bad}/metrics.jsonl line 1: bad JSON"),
        ([str(no_panels)], "none of loss, reward, reward/sampled, reward/greedy, rewards/margin"),
    ]
    out = tmp_path / "out" / "curves.png"
    out.parent.mkdir()
    for runs, message in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(["plot", *runs, "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("jaxalign: ") and message in err, err
        assert "\n" not in err
    assert not out.exists()
    with pytest.raises(DataError):
        read_metrics(str(empty))
    with pytest.raises(ConfigError, match="curves.txt: Format 'txt' is not supported"):
        plot_runs([str(torn)], str(tmp_path / "curves.txt"))
    assert not list(tmp_path.glob(".tmp-*"))
