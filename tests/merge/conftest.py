"""Fixtures of the merge tests."""

from __future__ import annotations

import jax
import numpy as np
import pytest


@pytest.fixture
def demo_merge_runs(tmp_path, monkeypatch):
    """Tiny converted checkpoints at the shipped merge configs' paths, runs/demo/{sft,dpo,grpo}
    under ``tmp_path`` (the working directory): a random base and two fine-tunes of it (+ 0.05
    N(0, 1)), every matrix 16 x 16 (one compiled program per method). Returns the Hugging Face
    tensors of each run by name."""
    from safetensors.numpy import load_file

    from jaxalign.checkpoint.convert import from_hf
    from jaxalign.checkpoint.hf import save_hf
    from jaxalign.models import get_preset, init_params

    rng = np.random.default_rng(1)
    config = get_preset(
        "tiny-64",
        vocab_size=16,
        d_model=16,
        n_layers=1,
        n_heads=2,
        n_kv_heads=2,
        head_dim=8,
        d_ff=16,
    )  # fmt: skip
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))  # no compiles
    base = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), shapes)
    tensors = {}
    for i, run in enumerate(("sft", "dpo", "grpo")):
        scale = np.float32(0.0 if i == 0 else 0.05)
        params = jax.tree.map(lambda x: x + scale * np.float32(rng.normal(size=x.shape)), base)  # noqa: B023
        save_hf(config, params, tmp_path / "hf" / run)
        tensors[run] = load_file(str(tmp_path / "hf" / run / "model.safetensors"))
        from_hf(tmp_path / "hf" / run, tmp_path / "runs" / "demo" / run)
    monkeypatch.chdir(tmp_path)
    return tensors
