"""Acceptance: a merge of two DPO runs of the demo (two short runs from one Hugging Face base,
different data orders) written by `jaxalign merge` loads in transformers with the logits
jaxalign computes from `merge_tree` of the runs' params."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxalign import models  # noqa: E402
from jaxalign.checkpoint import load_hf  # noqa: E402
from jaxalign.checkpoint.convert import load_model_params  # noqa: E402
from jaxalign.cli import main  # noqa: E402
from jaxalign.config import apply_overrides, load_config  # noqa: E402
from jaxalign.merge import MergeOptions, merge_tree  # noqa: E402
from jaxalign.train import train  # noqa: E402

pytestmark = pytest.mark.hf
ROOT = pathlib.Path(__file__).resolve().parents[2]
# configs/dpo/tiny.py's model (preset tiny-64) as a Hugging Face Llama, for the demo tokenizer.
TINY_64 = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)


def _base(path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_64))
    model.save_pretrained(path)
    return path


def _dpo_run(workdir, base, shuffle_seed):
    config = load_config(str(ROOT / "configs/dpo/tiny.py") + ":smoke=True")
    overrides = ["steps=2", "data.batch_size=8", "data.eval=", "checkpoint.every=2"]
    overrides += [f"model.init_from=hf:{base}", f"data.shuffle_seed={shuffle_seed}"]
    train(apply_overrides(config, overrides), workdir)
    return workdir


# Slow: test_soup_of_hf_and_checkpoint_loads_in_transformers (tests/merge/test_merge_driver.py)
# is its fast sibling.
@pytest.mark.slow
def test_ties_of_two_dpo_runs_loads_in_transformers_with_jaxalign_logits(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's data/demo paths
    base = _base(tmp_path / "base")
    runs = [_dpo_run(tmp_path / f"dpo{s}", base, shuffle_seed=s) for s in (1, 2)]
    cfg = tmp_path / "merge_cfg.py"
    # density 1: TIES' trim is per tensor, and a jaxalign params leaf stacks every layer's
    # tensor, so only at density 1 is merge_tree on params the per-tensor merge of the driver.
    cfg.write_text(
        "from jaxalign.merge.driver import merge_config\n\n\ndef get_config(arg=None):\n"
        "    c = merge_config()\n"
        '    c.method = "ties"\n'
        f'    c.base = "hf:{base}"\n'
        f'    c.models = ({{"model": "checkpoint:{runs[0]}", "weight": 0.6}}, '
        f'{{"model": "checkpoint:{runs[1]}", "weight": 0.4}})\n'
        "    c.lam = 1.5\n"
        "    return c\n"
    )
    out = tmp_path / "merged"
    main(["merge", "--config", str(cfg), "--out", str(out)])

    config, base_params = load_hf(base, dtype="float32")
    run_params = [load_model_params(r)[1] for r in runs]
    assert not np.allclose(  # the runs moved apart (different data orders)
        np.asarray(run_params[0]["embed"]["embedding"]),
        np.asarray(run_params[1]["embed"]["embedding"]),
    )
    options = MergeOptions(weights=(0.6, 0.4), densities=(1.0, 1.0), lam=1.5)
    merged = merge_tree("ties", base_params, run_params, options)
    tokens = np.random.default_rng(0).integers(0, 512, size=(3, 11))
    ours = models.logits(config, merged, models.forward(config, merged, jnp.asarray(tokens)))

    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)
    # The merge is not one of its inputs: the logits differ from the base's.
    base_logits = models.logits(
        config, base_params, models.forward(config, base_params, jnp.asarray(tokens))
    )
    assert np.abs(np.asarray(base_logits) - theirs).max() > 1e-3
