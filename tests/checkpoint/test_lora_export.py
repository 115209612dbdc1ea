"""A LoRA DPO run from a tiny Gemma 3 Hugging Face directory, exported merged (a full model) and as
a PEFT adapter directory: transformers (and peft on the transformers base) give jaxalign's
logits of the adapted model."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jaxalign import models  # noqa: E402
from jaxalign.checkpoint import convert, load_hf  # noqa: E402
from jaxalign.config import apply_overrides, load_config  # noqa: E402
from jaxalign.train import train  # noqa: E402

pytestmark = pytest.mark.hf
ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENS = np.random.default_rng(0).integers(0, 256, size=(2, 9))


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


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-gemma3")
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
    transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(root / "hf")
    config = load_config(str(ROOT / "configs/dpo/tiny.py") + ":smoke=True")
    config = apply_overrides(
        config,
        [
            f"model.init_from=hf:{root / 'hf'}",
            "lora.rank=4",
            "lora.alpha=8.0",
            "lora.targets=q_proj|v_proj|o_proj|down_proj",
            "optimizer.lr=0.05",  # big steps, so the adapters visibly move in a smoke run
        ],
    )
    result = train(config, root / "run")
    assert np.isfinite(result["train"]["loss"])
    return root


def _jax_adapted_logits(run_dir) -> np.ndarray:
    """jaxalign's own logits of the trained adapted model: base + attached adapters."""
    config, trained = convert.load_adapters(run_dir)
    _, base = load_hf(pathlib.Path(run_dir).parent / "hf")
    params = models.attach(base, trained["lora"])
    return np.asarray(models.logits(config, params, models.forward(config, params, TOKENS)))


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(TOKENS)).logits.numpy()


def test_checkpoint_holds_adapters_only(lora_run):
    """The saved state (params and optimizer state) is the adapters and their moments."""
    import orbax.checkpoint as ocp

    from jaxalign.checkpoint import manager as ckpt

    manager, step = ckpt.open_latest(lora_run / "run")
    manager.close()
    item = ckpt.checkpoint_dir(lora_run / "run") / str(step) / "state"
    saved = ocp.PyTreeCheckpointHandler().metadata(item).tree
    assert set(saved["params"]) == {"lora"}
    config, trained = convert.load_adapters(lora_run / "run")
    n_adapters = models.adapter_count(config)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(saved["params"])) == n_adapters
    n_saved = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(saved))
    # Adapters and two Adam moments (plus a few counters): 15% of the base here (rank 4 on a
    # d=64 model), against 300% for full fine-tuning.
    assert n_saved < 3 * n_adapters + 16 < 0.2 * models.param_count(config), n_saved
    assert set(trained) == {"lora"} and config.lora.rank == 4


def test_merged_export_gives_the_adapted_logits(lora_run):
    want = _jax_adapted_logits(lora_run / "run")
    rc, out, err = _cli(
        "convert", "to-hf", "--checkpoint", str(lora_run / "run"), "--out", str(lora_run / "m")
    )
    assert rc == 0, err[-2000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(lora_run / "m").eval()
    got = _torch_logits(model)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    base = transformers.AutoModelForCausalLM.from_pretrained(lora_run / "hf").eval()
    assert np.abs(_torch_logits(base) - want).max() > 1e-3  # the adapters changed the model


def test_peft_adapter_export_loads_onto_the_transformers_base(lora_run):
    want = _jax_adapted_logits(lora_run / "run")
    out = lora_run / "adapter"
    rc, stdout, err = _cli(
        "convert", "to-hf", "--checkpoint", str(lora_run / "run"), "--out", str(out), "--adapter"
    )
    assert rc == 0, err[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]
    from safetensors.numpy import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    name = "base_model.model.model.layers.2.self_attn.o_proj.lora_A.weight"
    assert tensors[name].shape == (4, 64)  # [r, N * H]
    assert tensors[name.replace("o_proj.lora_A", "q_proj.lora_B")].shape == (64, 4)  # [N H, r]
    assert len(tensors) == 3 * 4 * 2
    base = transformers.AutoModelForCausalLM.from_pretrained(lora_run / "hf")
    model = peft.PeftModel.from_pretrained(base, out).eval()
    np.testing.assert_allclose(_torch_logits(model), want, atol=1e-4, rtol=0)


def test_generate_and_init_from_a_lora_run_see_the_merged_model(lora_run):
    """`checkpoint:` of a LoRA run (jaxalign generate, model.init_from) is its merged model."""
    config, merged = convert.load_model_params(lora_run / "run")
    assert config.lora is None
    want = _jax_adapted_logits(lora_run / "run")
    got = models.logits(config, merged, models.forward(config, merged, TOKENS))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert jax.tree.structure(merged) == jax.tree.structure(models.abstract_params(config))
