"""Bad input to an online run: one line `jaxalign: ...` with status 2 naming the file, record,
reward or key, and no checkpoint for a refused step."""

import json
import pathlib
import textwrap

import pytest

from jaxalign import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
GRPO = f"{ROOT / 'configs/grpo/tiny.py'}:smoke=True"
TOKENIZER = str(ROOT / "data/demo/tokenizer.model")


def _train(capsys, workdir, *overrides, config=GRPO):
    argv = ["train", "--config", config, "--workdir", str(workdir)]
    argv += [f"--config.tokenizer={TOKENIZER}", "--config.data.eval=", *overrides]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and x.startswith("jaxalign: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return exit_info.value.code, lines[0]


def _prompts(tmp_path, records) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    """A module of user rewards, importable as `user_rewards`."""
    (tmp_path / "user_rewards.py").write_text(
        textwrap.dedent(
            """
            calls = []

            def fails_on_the_second_step():
                def reward(record, completion):
                    calls.append(1)
                    if len(calls) > 8:  # the smoke run scores 4 prompts x 2 per step
                        raise ValueError("the verifier crashed")
                    return 1.0
                return reward

            def nan_for_long_prompts(limit=12):
                def reward(record, completion):
                    return float("nan") if len(record["prompt"]) > limit else 0.5
                return reward
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_rewards"


def test_a_malformed_prompt_record_names_the_file_and_line(capsys, tmp_path):
    prompts = _prompts(tmp_path, [{"prompt": "What is 1+2?"}, {"question": "What is 3+4?"}])
    code, line = _train(capsys, tmp_path / "run", f"--config.data.train={prompts}")
    assert code == 2 and f"{prompts} line 2" in line and '"prompt"' in line, line


def test_a_reward_that_raises_refuses_the_step_and_saves_nothing_for_it(
    capsys, tmp_path, rewards_module
):
    workdir = tmp_path / "run"
    reward = f"{rewards_module}:fails_on_the_second_step"
    code, line = _train(
        capsys,
        workdir,
        f"--config.rl.rewards=(('{reward}', 1.0),)",
        "--config.rl.group_size=2",
        "--config.checkpoint.every=1",
        config=f"{ROOT / 'configs/reinforce_pp/tiny.py'}:smoke=True",
    )
    assert code == 2, line
    assert line.startswith(f'jaxalign: step 1: reward "{reward}" failed on record 0 (prompt '), line
    assert "ValueError: the verifier crashed" in line and "step is refused" in line, line
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]


def test_a_reward_that_returns_nan_is_refused_naming_the_prompt(capsys, tmp_path, rewards_module):
    prompts = _prompts(tmp_path, [{"prompt": "What is 1+2?"}, {"prompt": "What is 31+42?"}])
    reward = f"{rewards_module}:nan_for_long_prompts"
    code, line = _train(
        capsys,
        tmp_path / "run",
        f"--config.data.train={prompts}",
        f"--config.rl.rewards=(('{reward}', 1.0, {{'limit': 12}}),)",
    )
    assert code == 2, line
    assert f'reward "{reward}" returned nan' in line and "'What is 31+42?'" in line, line
    assert "expected a finite number" in line and not (tmp_path / "run/checkpoints/1").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["--config.rl.rewards=(('no_such_reward', 1.0),)"],
            'rewards[0]: unknown reward "no_such_reward"',
        ),
        (
            ["--config.rl.rewards=(('no_such_module:fn', 1.0),)"],
            'reward "no_such_module:fn": cannot import no_such_module',
        ),
        (
            ["--config.rl.minibatches=3"],
            "data.batch_size x rl.group_size rollout rows = 32 per step do not split into "
            "rl.minibatches=3",
        ),
        (["--config.rl.group_size=1"], "rl.group_size=1: grpo compares the completions"),
        (["--config.rl.kl_target=0.1"], "grpo's k3 loss term takes the fixed rl.kl_coef"),
        (
            ["--config.rl.group_size=3"],
            "this process has 12 rows (shape (1, 12, 23)), not divisible by its 8 row shards",
        ),
    ],
)
def test_config_mistakes_of_an_online_run(capsys, tmp_path, overrides, message):
    code, line = _train(capsys, tmp_path / "run", *overrides)
    assert code == 2 and message in line, line
    assert not (tmp_path / "run/checkpoints").exists() or not any(
        (tmp_path / "run/checkpoints").iterdir()
    )


def test_a_reward_model_of_another_tokenizer_is_refused(capsys, tmp_path):
    model = tmp_path / "rm"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"tokenizer": "/elsewhere/tokenizer.model"}))
    code, line = _train(capsys, tmp_path / "run", f"--config.rl.reward_model={model}")
    assert code == 2, line
    assert f"rl.reward_model={model} was trained with tokenizer /elsewhere/tokenizer.model" in line
