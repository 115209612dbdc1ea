"""`jaxalign convert` both ways through the CLI, and training that starts from a Hugging Face
directory (`model.init_from="hf:DIR"`) or from a converted checkpoint."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from jaxalign.config import apply_overrides, load_config  # noqa: E402
from jaxalign.train import train  # noqa: E402

pytestmark = pytest.mark.hf
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random-init tiny Llama saved by transformers; its vocab covers the demo tokenizer."""
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    out = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(out)
    return out


def _tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(safetensors_numpy.load_file(str(file)))
    return out


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxalign.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_round_trip_is_bit_identical(hf_dir, tmp_path):
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    rc, _, err = _cli("convert", "from-hf", "--hf", str(hf_dir), "--out", str(ckpt))
    assert rc == 0, err[-2000:]
    rc, _, err = _cli("convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(back))
    assert rc == 0, err[-2000:]
    original, exported = _tensors(hf_dir), _tensors(back)
    assert original.keys() == exported.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(back)
    assert model.config.num_hidden_layers == 2


def test_cli_convert_errors_are_one_line(tmp_path):
    rc, _, err = _cli("convert", "from-hf", "--hf", str(tmp_path), "--out", str(tmp_path / "x"))
    assert rc == 2
    assert err.strip().startswith("jaxalign: ") and "config.json: not found" in err


def _dpo_config(init_from):
    config = load_config(str(ROOT / "configs/dpo/tiny.py") + ":smoke=True")
    return apply_overrides(config, [f"model.init_from={init_from}"])


def test_dpo_starts_from_a_hf_directory_and_exports(hf_dir, tmp_path):
    """The issue's end-to-end path: HF model -> DPO steps -> HF model transformers loads."""
    result = train(_dpo_config(f"hf:{hf_dir}"), tmp_path / "run")
    assert np.isfinite(result["train"]["loss"])
    rc, _, err = _cli(
        "convert", "to-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out")
    )
    assert rc == 0, err[-2000:]
    trained, original = _tensors(tmp_path / "out"), _tensors(hf_dir)
    assert trained.keys() == original.keys()
    assert any(not np.array_equal(trained[k], original[k]) for k in original)  # it trained
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_dpo_starts_from_a_converted_checkpoint(hf_dir, tmp_path):
    """The architecture comes from the checkpoint's record, whatever `model.preset` says."""
    from jaxalign.checkpoint import convert

    convert.from_hf(hf_dir, tmp_path / "ckpt")
    config = _dpo_config(f"checkpoint:{tmp_path / 'ckpt'}")  # preset tiny-64 has vocab 512
    result = train(config, tmp_path / "run")
    assert np.isfinite(result["train"]["loss"])
    assert convert.read_model_config(tmp_path / "run").vocab_size == 256


# Slow: test_dpo_starts_from_a_hf_directory_and_exports (Llama) and the Gemma 3 DPO export of
# tests/checkpoint/test_lora_export.py are its fast siblings.
@pytest.mark.slow
def test_dpo_from_a_gemma3_directory_exports_what_transformers_runs(tmp_path):
    """Gemma 3 through the whole path (capped training log-probs, the architecture recorded in
    the run's checkpoint, export): transformers' logits of the export equal jaxalign's."""
    from jaxalign import models
    from jaxalign.checkpoint import convert, load_hf

    hf_config = transformers.Gemma3TextConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        sliding_window_pattern=3,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        final_logit_softcapping=5.0,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(tmp_path / "hf")
    result = train(_dpo_config(f"hf:{tmp_path / 'hf'}"), tmp_path / "run")
    assert np.isfinite(result["train"]["loss"])
    recorded = convert.read_model_config(tmp_path / "run")
    assert recorded == load_hf(tmp_path / "hf")[0]
    convert.to_hf(tmp_path / "run", tmp_path / "out")
    config, params = load_hf(tmp_path / "out")
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 9))
    want = models.logits(config, params, models.forward(config, params, tokens))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        got = model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
