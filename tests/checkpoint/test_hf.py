"""Hugging Face conversion: logits parity with transformers both ways, bit-exact round trips,
sharded and bf16 checkpoints, shardings, and errors that name the tensor."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from jaxalign.checkpoint.hf import config_from_hf, load_hf, save_hf  # noqa: E402
from jaxalign.errors import CheckpointError  # noqa: E402
from jaxalign.models import forward, logits  # noqa: E402

pytestmark = pytest.mark.hf

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "llama": lambda: transformers.LlamaConfig(**TINY, rms_norm_eps=1e-5),
    "llama31_tied": lambda: transformers.LlamaConfig(
        **TINY, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, tie_word_embeddings=True
    ),
    "mistral_window": lambda: transformers.MistralConfig(**TINY, sliding_window=4),
    "qwen2_tied": lambda: transformers.Qwen2Config(
        **TINY, rope_theta=1e6, tie_word_embeddings=True
    ),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=32, rope_theta=1e6),
    # Two layers: one local (window 4 < T), one global; small caps so that they bite.
    "gemma2": lambda: transformers.Gemma2Config(
        **TINY,
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=5.0,
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **TINY,
        head_dim=16,
        sliding_window=4,
        sliding_window_pattern=2,
        query_pre_attn_scalar=24,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        final_logit_softcapping=5.0,
    ),
}
T = 12
RNG = np.random.default_rng(0)
TOKENS = RNG.integers(0, 256, size=(2, T)).astype(np.int32)


def _hf_model(hf_config, dtype=torch.float32):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():  # random norms too, so a misplaced scale cannot hide
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def _hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


def _jax_logits(config, params, tokens, positions=None, segment_ids=None) -> np.ndarray:
    fn = jax.jit(lambda p, t, pos, seg: logits(config, p, forward(config, p, t, pos, seg)))
    return np.asarray(fn(params, tokens, positions, segment_ids))


def _tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(safetensors_numpy.load_file(str(file)))
    return out


def _write_tokenizer(directory: pathlib.Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(250)} | {"<s>": 250, "</s>": 251, "<unk>": 252}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """case -> (directory, transformers model), built once per module."""
    root = tmp_path_factory.mktemp("hf")
    built = {}
    for name, make in CASES.items():
        hf_config = make()
        hf_config.bos_token_id, hf_config.eos_token_id = 250, 251
        model = _hf_model(hf_config)
        model.save_pretrained(root / name)
        built[name] = (root / name, model)
    _write_tokenizer(root / "llama")
    return built


@pytest.mark.parametrize("case", list(CASES))
def test_load_matches_transformers_logits_and_packing(hf_dirs, case):
    directory, model = hf_dirs[case]
    config, params = load_hf(directory)
    assert config.param_dtype == "float32"
    want = _hf_logits(model, TOKENS)
    got = _jax_logits(config, params, TOKENS)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    # Packed row: sequences of 5 and 7 tokens with restarted positions equal their own rows.
    a, b = TOKENS[0, :5], TOKENS[1, :7]
    packed = np.concatenate([a, b])[None]
    positions = np.concatenate([np.arange(5), np.arange(7)])[None].astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 7], np.int32)
    got_packed = _jax_logits(config, params, packed, positions, segments)[0]
    np.testing.assert_allclose(got_packed[:5], _hf_logits(model, a[None])[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_packed[5:], _hf_logits(model, b[None])[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_and_round_trips_bit_exact(hf_dirs, tmp_path, case):
    directory, model = hf_dirs[case]
    config, params = load_hf(directory)
    tokenizer = directory if case == "llama" else None
    out = save_hf(config, params, tmp_path / "export", tokenizer=tokenizer)

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(model)
    np.testing.assert_allclose(_hf_logits(reloaded, TOKENS), _hf_logits(model, TOKENS), atol=1e-6)

    original, exported = _tensors(directory), _tensors(out)
    assert original.keys() == exported.keys()
    for name in original:
        assert original[name].dtype == exported[name].dtype, name
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)

    hf_a = json.loads((directory / "config.json").read_text())
    hf_b = json.loads((out / "config.json").read_text())
    assert config_from_hf(hf_b) == config_from_hf(hf_a) == config
    cfg_a, cfg_b = model.config, reloaded.config
    for key in (
        "architectures",
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_parameters",
        "tie_word_embeddings",
        "max_position_embeddings",
        "sliding_window",
        "layer_types",
        "attention_bias",
        "hidden_act",
    ):
        assert getattr(cfg_b, key, None) == getattr(cfg_a, key, None), key
    # Qwen2Config has no head_dim attribute (derived as hidden / heads); we write it explicitly.
    head_dim = cfg_a.hidden_size // cfg_a.num_attention_heads
    assert getattr(cfg_b, "head_dim", head_dim) == getattr(cfg_a, "head_dim", head_dim)
    assert json.loads((out / "generation_config.json").read_text()) is not None
    if tokenizer is not None:
        assert (cfg_b.bos_token_id, cfg_b.eos_token_id) == (250, 251)
        for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (out / file).is_file(), file
        tok = transformers.AutoTokenizer.from_pretrained(out)
        assert tok.convert_tokens_to_ids(["w3", "</s>"]) == [3, 251]


def test_sharded_checkpoints_both_ways(hf_dirs, tmp_path):
    directory, model = hf_dirs["qwen2_tied"]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    config, params = load_hf(tmp_path / "sharded")
    ref_config, ref_params = load_hf(directory)
    assert config == ref_config
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)

    out = save_hf(config, params, tmp_path / "export", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == sorted(set(index["weight_map"].values())) and len(files) > 2
    assert index["weight_map"].keys() == _tensors(directory).keys()
    for file in out.glob("*.safetensors"):  # only a single tensor may exceed the limit
        tensors = safetensors_numpy.load_file(str(file))
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 40_000, file
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    np.testing.assert_allclose(_hf_logits(reloaded, TOKENS), _hf_logits(model, TOKENS), atol=1e-6)


def test_bf16_load_and_round_trip(hf_dirs, tmp_path):
    _, model = hf_dirs["qwen3"]
    bf16 = _hf_model(model.config, dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    config, params = load_hf(tmp_path / "bf16")
    assert config.param_dtype == config.dtype == "bfloat16"
    assert {x.dtype.name for x in jax.tree.leaves(params)} == {"bfloat16"}
    q = bf16.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["attn"]["q_proj"]["kernel"][1], np.float32),
        q.T.reshape(64, 4, 32),
    )
    _, params32 = load_hf(tmp_path / "bf16", dtype="float32")
    assert params32["embed"]["embedding"].dtype == np.float32
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), params, params32
    )

    out = save_hf(config, params, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    original, exported = _tensors(tmp_path / "bf16"), _tensors(out)
    assert original.keys() == exported.keys()
    for name in original:
        assert exported[name].dtype == original[name].dtype, name
        np.testing.assert_array_equal(
            exported[name].view(np.uint16), original[name].view(np.uint16), err_msg=name
        )


def test_load_places_params_with_shardings(hf_dirs):
    directory, _ = hf_dirs["llama"]
    _, ref = load_hf(directory)
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), devices=jax.devices()[:8])
    P = jax.sharding.PartitionSpec

    def spec(x):
        axes = [None] * x.ndim
        axes[-1] = "tensor"
        if x.ndim >= 2 and x.shape[-2] % 2 == 0:
            axes[-2] = "fsdp"
        return jax.sharding.NamedSharding(mesh, P(*axes))

    shardings = jax.tree.map(spec, ref)
    _, params = load_hf(directory, shardings=shardings)
    for x, s, r in zip(*(jax.tree.leaves(t) for t in (params, shardings, ref)), strict=True):
        assert x.sharding == s
        np.testing.assert_array_equal(np.asarray(x), np.asarray(r))


def _edit_checkpoint(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    shutil.copytree(src, dst)
    tensors = safetensors_numpy.load_file(str(dst / "model.safetensors"))
    edit(tensors)
    safetensors_numpy.save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            "model.layers.1.mlp.up_proj.weight: missing tensor",
        ),
        (
            lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}),
            "model.layers.0.self_attn.o_proj.bias: unexpected tensor",
        ),
        (
            lambda t: t.update(
                {"model.layers.1.self_attn.q_proj.weight": np.zeros((64, 32), np.float32)}
            ),
            "model.layers.1.self_attn.q_proj.weight: expected shape (64, 64), found (64, 32)",
        ),
        (
            lambda t: t.update({"model.norm.weight": np.zeros(64, np.int32)}),
            "model.norm.weight: expected dtype float32/bfloat16/float16, found I32",
        ),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_bad_tensors_are_named(hf_dirs, tmp_path, edit, message):
    bad = _edit_checkpoint(hf_dirs["llama"][0], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as info:
        load_hf(bad)
    assert message in str(info.value)


def test_unknown_architecture(hf_dirs, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(hf_dirs["llama"][0], bad)
    hf = json.loads((bad / "config.json").read_text())
    hf["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="unknown architecture 'GPT2LMHeadModel'"):
        load_hf(bad)


def test_gemma_configs_refused_with_the_reason():
    from jaxalign.checkpoint.hf import family_for
    from jaxalign.models import get_preset

    hub = HUB_CONFIGS["gemma3-1b"]
    with pytest.raises(CheckpointError, match="hidden_activation='gelu'; only 'gelu_pytorch_tanh'"):
        config_from_hf(hub | {"hidden_activation": "gelu"})
    with pytest.raises(CheckpointError, match="use_bidirectional_attention=true"):
        config_from_hf(hub | {"use_bidirectional_attention": True})
    odd = ["sliding_attention", "full_attention", "full_attention"] + ["sliding_attention"] * 23
    with pytest.raises(CheckpointError, match="layer_types=.* mix sliding and full attention"):
        config_from_hf(hub | {"layer_types": odd})
    with pytest.raises(CheckpointError, match="expected 26 entries"):
        config_from_hf(hub | {"layer_types": ["sliding_attention"] * 3})
    local_scaled = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    rope = {"full_attention": {"rope_theta": 1e6}, "sliding_attention": local_scaled}
    with pytest.raises(CheckpointError, match="RoPE scaling on sliding-window layers"):
        config_from_hf(hub | {"rope_parameters": rope})
    # Layer patterns: all local, none, every P-th global; Qwen's layer_types too.
    assert (
        config_from_hf(hub | {"layer_types": ["sliding_attention"] * 26}).sliding_window_pattern
        is None
    )
    assert config_from_hf(hub | {"layer_types": ["full_attention"] * 26}).sliding_window is None
    qwen = HUB_CONFIGS["qwen2.5-0.5b"] | {
        "layer_types": ["sliding_attention", "full_attention"] * 12
    }
    assert config_from_hf(qwen).sliding_window_pattern == 2

    gemma2 = get_preset("gemma2-2b")
    assert family_for(gemma2).architecture == "Gemma2ForCausalLM"
    assert family_for(get_preset("gemma3-4b")).architecture == "Gemma3ForCausalLM"
    with pytest.raises(
        CheckpointError,
        match=r"Gemma3ForCausalLM cannot express .*qk_norm=False.*"
        r"rope_local_theta=None.*attn_logit_softcap=50.0",
    ):
        family_for(gemma2, "Gemma3ForCausalLM")
    with pytest.raises(
        CheckpointError, match=r"LlamaForCausalLM cannot express .*norm_plus_one=True"
    ):
        family_for(
            gemma2.replace(sliding_window=None, sliding_window_pattern=None), "LlamaForCausalLM"
        )
    with pytest.raises(
        CheckpointError, match=r"MistralForCausalLM cannot express .*sliding_window_pattern=2"
    ):
        family_for(get_preset("mistral-7b", sliding_window=8, sliding_window_pattern=2))


def test_failed_export_leaves_no_directory(hf_dirs, tmp_path, monkeypatch):
    config, params = load_hf(hf_dirs["llama"][0])
    out_root = tmp_path / "exports"
    out_root.mkdir()
    real_save = safetensors_numpy.save_file
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors_numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_hf(config, params, out_root / "model", max_shard_size="40KB")
    assert len(calls) == 2 and list(out_root.iterdir()) == []
    monkeypatch.undo()

    # An existing directory survives a refused or failed overwrite.
    (out_root / "model").mkdir()
    (out_root / "model" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        save_hf(config, params, out_root / "model")
    broken = {**params, "final_norm": {"scale": np.ones(32, np.float32)}}
    with pytest.raises(CheckpointError, match=r"final_norm/scale: expected shape \(64,\)"):
        save_hf(config, broken, out_root / "model", overwrite=True)
    assert sorted(p.name for p in out_root.iterdir()) == ["model"]
    assert (out_root / "model" / "keep.txt").read_text() == "x"


HUB_CONFIGS = {  # config.json of the hub checkpoints (transformers 4 keys), trimmed to what matters
    "llama3.1-70b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "hidden_act": "silu",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 128256,
    },
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 32768,
    },
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
}


_GEMMA2_HUB = {  # google/gemma-2-2b config.json (transformers 4; no tie_word_embeddings key)
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "attention_bias": False,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "torch_dtype": "float32",
    "vocab_size": 256000,
}
HUB_CONFIGS |= {
    "gemma2-2b": _GEMMA2_HUB,
    "gemma2-9b": _GEMMA2_HUB  # google/gemma-2-9b
    | {
        "hidden_size": 3584,
        "intermediate_size": 14336,
        "num_attention_heads": 16,
        "num_hidden_layers": 42,
        "num_key_value_heads": 8,
        "sliding_window_size": 4096,
    },
    "gemma3-1b": {  # google/gemma-3-1b-pt
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "max_position_embeddings": 32768,
        "num_attention_heads": 4,
        "num_hidden_layers": 26,
        "num_key_value_heads": 1,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16",
        "vocab_size": 262144,
    },
    # google/gemma-3-4b-pt: its config.json's text_config, which leaves the rest to
    # Gemma3TextConfig's defaults (8 heads, 4 kv heads, vocab 262208, ...).
    "gemma3-4b": {
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
}
# Published parameter counts: the safetensors totals of the hub checkpoints (also KerasHub's
# preset metadata). gemma3-4b is its language model alone: 4,300,079,472 on the hub include the
# SigLIP vision tower and projector; the text-only GGUF conversions report 3,880,263,168.
GEMMA_PUBLISHED = {
    "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984,
    "gemma3-1b": 999_885_952,
    "gemma3-4b": 3_880_263_168,
}


@pytest.mark.parametrize("preset", list(HUB_CONFIGS))
def test_hub_configs_match_presets_and_round_trip(preset):
    from jaxalign.checkpoint.hf import config_to_hf, family_for
    from jaxalign.models import get_preset, param_count

    want = get_preset(preset, dtype="bfloat16", param_dtype="bfloat16")
    config = config_from_hf(HUB_CONFIGS[preset], dtype="bfloat16")
    assert config == want
    if preset in GEMMA_PUBLISHED:
        assert param_count(config) == GEMMA_PUBLISHED[preset]
    arch = HUB_CONFIGS[preset]["architectures"][0]
    written = config_to_hf(config, family_for(config, arch), "bfloat16")
    assert written["architectures"] == [arch]
    assert config_from_hf(written, dtype="bfloat16") == config
