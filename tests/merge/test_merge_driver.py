"""`jaxalign merge` end to end on tiny random Hugging Face Llama directories (and a converted
checkpoint): the written tensors equal the NumPy method applied to the inputs' tensors, the output
loads in transformers, and bad inputs fail with one `jaxalign:` line naming the tensor."""

from __future__ import annotations

import pathlib

import jax
import merge_reference as ref
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from jaxalign.cli import main  # noqa: E402
from jaxalign.config import load_config  # noqa: E402
from jaxalign.merge import dare_key  # noqa: E402
from jaxalign.merge.driver import check_config  # noqa: E402

pytestmark = pytest.mark.hf
ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _hf_dir(path, seed, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**(TINY | overrides))
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [_hf_dir(root / f"m{i}", seed=i) for i in range(3)]


def _config(tmp_path, body: str) -> str:
    file = tmp_path / "merge_cfg.py"
    file.write_text(
        "from jaxalign.merge.driver import merge_config\n\n\ndef get_config(arg=None):\n"
        "    c = merge_config()\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
        + "    return c\n"
    )
    return str(file)


def _tensors(path):
    return safetensors_numpy.load_file(str(path / "model.safetensors"))


def test_ties_and_dare_through_the_cli_match_numpy(dirs, tmp_path, capsys):
    base, a, b = dirs
    models = (
        f'({{"model": "hf:{a}", "weight": 0.7, "density": 0.4}}, '
        f'{{"model": "hf:{b}", "weight": 0.3, "density": 0.8}})'
    )
    for method in ("ties", "dare_ties", "dare"):
        cfg = _config(
            tmp_path,
            f'c.method = "{method}"\nc.base = "hf:{base}"\nc.models = {models}\n'
            "c.lam = 0.9\nc.seed = 5",
        )
        out = tmp_path / method
        main(["merge", "--config", cfg, "--out", str(out)])
        printed = capsys.readouterr().out
        assert f"wrote {out}" in printed and "peak tensors held" in printed
        got, tb, ta, tc = _tensors(out), _tensors(base), _tensors(a), _tensors(b)
        assert set(got) == set(tb)
        for name in got:
            xs, w, d = [ta[name], tc[name]], (0.7, 0.3), (0.4, 0.8)
            if method == "ties":
                want = ref.ties(tb[name], xs, w, d, 0.9)
            else:
                masks = [
                    np.asarray(jax.random.bernoulli(dare_key(5, name, i), di, tb[name].shape))
                    for i, di in enumerate(d)
                ]
                want = ref.dare(tb[name], xs, w, d, masks, 0.9, elect=method == "dare_ties")
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_soup_of_hf_and_checkpoint_loads_in_transformers(dirs, tmp_path, capsys):
    from jaxalign.checkpoint.convert import from_hf

    from_hf(dirs[1], tmp_path / "ckpt")
    cfg = _config(
        tmp_path,
        f'c.method = "linear"\nc.models = ({{"model": "hf:{dirs[0]}", "weight": 1.0}}, '
        f'{{"model": "checkpoint:{tmp_path / "ckpt"}", "weight": 3.0}})',
    )
    out = tmp_path / "soup"
    main(["merge", "--config", cfg, "--out", str(out)])
    got, t0, t1 = _tensors(out), _tensors(dirs[0]), _tensors(dirs[1])
    for name in got:
        np.testing.assert_allclose(
            got[name], ref.linear([t0[name], t1[name]], (1.0, 3.0)), rtol=1e-5, atol=1e-6
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    np.testing.assert_array_equal(state["model.norm.weight"].numpy(), got["model.norm.weight"])
    assert not list(out.parent.glob(".soup.tmp-*"))


def test_restore_through_the_cli_matches_numpy(dirs, tmp_path, capsys):
    aligned, tuned = dirs[0], dirs[1]
    tb, tx = _tensors(aligned), _tensors(tuned)
    names = sorted(tb)
    for key, value, want_kw in (
        ("top_k", "3", dict(top_k=3)),
        ("fraction", "0.3", dict(fraction=0.3)),
        ("pattern", '"mlp|norm"', dict(pattern="mlp|norm")),
        ("pattern", '"no-such-tensor"', dict(pattern="no-such-tensor")),
    ):
        cfg = _config(
            tmp_path,
            f'c.method = "restore"\nc.base = "hf:{aligned}"\n'
            f'c.models = ({{"model": "hf:{tuned}"}},)\nc.restore.{key} = {value}',
        )
        out = tmp_path / f"restore-{key}-{len(list(tmp_path.iterdir()))}"
        main(["merge", "--config", cfg, "--out", str(out)])
        printed = capsys.readouterr().out
        want_names, want = ref.restore(
            [tb[n] for n in names], [tx[n] for n in names], names, **want_kw
        )
        assert f"restored {len(want_names)} of {len(names)} tensors" in printed, printed
        shown = printed.split(" tensors: ")[-1].strip().removesuffix(", ...").split(", ")
        assert shown == ["none"] if not want_names else set(shown) <= set(want_names)
        got = _tensors(out)
        for name, w in zip(names, want, strict=True):
            np.testing.assert_array_equal(got[name], np.float32(w), err_msg=name)
        if key == "pattern" and not want_names:  # nothing restored: the fine-tuned model
            assert all(np.array_equal(got[n], tx[n]) for n in names)


def _fails(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxalign: ") and "\n" not in err
    return err


def test_refuses_other_vocabulary_and_architecture(dirs, tmp_path, capsys):
    other_vocab = _hf_dir(tmp_path / "v", seed=0, vocab_size=128)
    deeper = _hf_dir(tmp_path / "deep", seed=0, num_hidden_layers=3)
    capsys.readouterr()  # transformers' own progress output
    for other, named in ((other_vocab, "model.embed_tokens.weight"), (deeper, "model.layers.2.")):
        cfg = _config(
            tmp_path,
            f'c.method = "task_arithmetic"\nc.base = "hf:{dirs[0]}"\n'
            f'c.models = ({{"model": "hf:{other}"}},)',
        )
        err = _fails(capsys, ["merge", "--config", cfg, "--out", str(tmp_path / "x")])
        assert named in err and str(other) in err
        assert not (tmp_path / "x").exists()


def test_bad_configs(dirs, tmp_path, capsys):
    one = f'({{"model": "hf:{dirs[1]}"}},)'
    two = f'({{"model": "hf:{dirs[1]}"}}, {{"model": "hf:{dirs[2]}"}})'
    cases = {
        f'c.method = "average"\nc.models = {one}': "method 'average' is unknown",
        f'c.method = "ties"\nc.models = {one}': "needs a base model",
        f'c.method = "slerp"\nc.base = "hf:{dirs[0]}"\nc.models = {two}': "exactly one model",
        f'c.method = "linear"\nc.models = ({{"model": "{dirs[1]}"}},)': "expected hf:DIR",
        f'c.method = "ties"\nc.base = "hf:{dirs[0]}"\n'
        f'c.models = ({{"model": "hf:{dirs[1]}", "density": 0.0}},)': "density 0.0 not in",
        f'c.method = "linear"\nc.models = ({{"model": "hf:{dirs[1]}", "wieght": 2}},)': "wieght",
        f'c.method = "restore"\nc.base = "hf:{dirs[0]}"\nc.models = {one}\n'
        'c.restore.pattern = "mlp("': "restore.pattern 'mlp(' is not a regex",
        f'c.method = "restore"\nc.base = "hf:{dirs[0]}"\nc.models = {one}\n'
        "c.restore.fraction = 1.5": "restore.fraction 1.5 not in (0, 1]",
        f'c.method = "restore"\nc.base = "hf:{dirs[0]}"\nc.models = {one}\n'
        "c.restore.top_k = -2": "restore.top_k -2; expected a count >= 1",
        f'c.method = "restore"\nc.base = "hf:{dirs[0]}"\nc.models = {one}\n'
        'c.restore.top_k = 2\nc.restore.pattern = "mlp"': "(set: pattern, top_k)",
        f'c.method = "restore"\nc.base = "hf:{dirs[0]}"\nc.models = {one}': "(set: none)",
        f'c.method = "restore"\nc.base = "hf:{dirs[0]}"\nc.models = {two}\n'
        "c.restore.top_k = 1": "restore merges the base with exactly one model",
        f'c.method = "ties"\nc.base = "hf:{dirs[0]}"\nc.models = {one}\n'
        "c.restore.top_k = 1": "restore.top_k is a key of method restore only",
        f'c.method = "restore"\nc.models = {one}\nc.restore.top_k = 1': "needs a base model",
    }
    for body, message in cases.items():
        err = _fails(capsys, ["merge", "--config", _config(tmp_path, body), "--out", "unused"])
        assert message in err, err
    cfg = _config(tmp_path, f'c.method = "linear"\nc.models = {one}')
    assert "already exists" in _fails(capsys, ["merge", "--config", cfg, "--out", str(tmp_path)])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs/merge").glob("*.py")))
def test_example_configs_load(name):
    plan = check_config(load_config(str(ROOT / "configs/merge" / name)))
    assert plan.models
