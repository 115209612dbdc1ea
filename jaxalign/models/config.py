"""Model configuration: frozen dataclasses and named presets, HF-exact hyperparameters."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

REMAT_POLICIES = ("none", "full", "dots")
ACTIVATIONS = ("silu", "gelu_tanh")
ATTENTIONS = ("auto", "xla", "cudnn", "splash")  # jaxalign.models.attention
LAYER_LOOPS = ("auto", "scan", "unroll")
ROPE_SCALING_TYPES = ("llama3", "linear")
# The projections a LoRA adapter can sit on, named as `LoraConfig.targets` sees them.
LORA_MODULES = (
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, Hugging Face ``rope_type`` "llama3" (default) or "linear".

    "llama3" (Llama 3.1): wavelengths longer than ``original_max_position_embeddings /
    low_freq_factor`` are divided by ``factor``, shorter than ``original_max_position_embeddings /
    high_freq_factor`` are kept, and the band in between is interpolated smoothly (Meta, "The
    Llama 3 Herd of Models", 2024). "linear" (position interpolation, Chen et al. 2023; Gemma 3's
    global layers): every frequency is divided by ``factor``; the other fields are unused.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"

    def __post_init__(self):
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(
                f"RopeScaling.rope_type={self.rope_type!r}; expected one of {ROPE_SCALING_TYPES}"
            )


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the decoder's projections (Hu et al., "LoRA", 2021):

        y = W x + (alpha / r) B A dropout(x),   A [in, r], B [r, out], B = 0 at init,

    so the adapted model equals the base at step 0. ``targets`` is a regular expression searched
    in each projection's name (``LORA_MODULES``: "attn.q_proj", ..., "mlp.down_proj"), e.g.
    "q_proj|v_proj" or "proj" (all seven); it must match at least one. ``dropout`` p drops
    adapter inputs (scaled by 1 / (1 - p)) in training steps only; the base path never sees it.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: str = "q_proj|v_proj"

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank={self.rank}; expected >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout={self.dropout}; expected in [0, 1)")
        try:
            pattern = re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"LoraConfig.targets={self.targets!r}: not a regex ({e})") from None
        if not any(pattern.search(m) for m in LORA_MODULES):
            raise ValueError(
                f"LoraConfig.targets={self.targets!r} matches none of {', '.join(LORA_MODULES)}"
            )

    @property
    def scale(self) -> float:
        """alpha / r, the factor on B A x."""
        return self.alpha / self.rank

    def modules(self) -> tuple[str, ...]:
        """The names in ``LORA_MODULES`` that ``targets`` matches."""
        return tuple(m for m in LORA_MODULES if re.search(self.targets, m))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5/3, Gemma 2/3).

    Shape letters: V vocab_size, D d_model, L n_layers, N n_heads, K n_kv_heads, H head_dim,
    F d_ff. ``dtype`` is the compute (activation) dtype, ``param_dtype`` the storage dtype of the
    weights; norms, RoPE angles and the attention softmax always run in float32. ``remat`` picks
    the rematerialisation of the scanned layer body: "none", "full" (save nothing) or "dots" (save
    matmul outputs without batch dims:
    ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``).

    Attention layers: with ``sliding_window`` W set, layer i is local (a query sees keys less than
    W positions back) and the others global (full causal); ``sliding_window_pattern`` None makes
    every layer local (Mistral), P makes every P-th layer global, i.e. layer i is local iff
    ``(i + 1) % P != 0`` (Gemma 2: P = 2, Gemma 3: P = 6; ``local_layers`` gives the flags).
    ``rope_local_theta`` gives local layers their own RoPE base without frequency scaling (Gemma 3's
    ``rope_local_base_freq``); None: local layers use ``rope_theta`` and ``rope_scaling`` too.

    Gemma options, all off by default: ``norm_plus_one`` (RMSNorm scales by ``1 + w``, weights
    stored as Hugging Face stores them and initialised to 0), ``post_norms`` (an RMSNorm on the
    attention and MLP outputs before each residual add), ``embed_scale`` (embeddings times
    sqrt(D), the factor rounded to the compute dtype), ``activation`` "gelu_tanh" (GeGLU with the
    tanh-approximate GELU), ``query_pre_attn_scalar`` s (attention logits scaled by ``s ** -0.5``
    instead of ``H ** -0.5``), ``attn_logit_softcap`` and ``final_logit_softcap`` c (logits
    z -> c * tanh(z / c); the final cap applies in ``logits`` and in the log-prob/KL kernels).

    ``attention`` picks the attention kernel of the forward pass (``jaxalign.models.attention``):
    "auto" (cuDNN fused attention on GPU, the Pallas splash kernel on TPU when T is a multiple of
    128, XLA elsewhere), "xla" (the reference), "cudnn" or "splash". It changes how, not what, the
    model computes (cuDNN leaves the soft-capped attention of Gemma 2 to XLA, splash takes it;
    decoding with a KV cache always uses XLA).

    ``layer_loop`` picks how the full-sequence forward runs the layer stack: "scan"
    (``jax.lax.scan`` over the stacked layers: the compiled program and its compile time do not
    grow with L), "unroll" (the same scan fully unrolled: L copies of the layer in the program;
    on CPU the scanned backward copies its stacked residuals and gradients, and unrolled the
    decoder's forward + backward ran 1.33x faster, measured in README "Performance") or "auto"
    (unroll on a CPU platform, scan elsewhere). It changes how, not what, the model computes
    (floating-point rounding aside). Decoding with a KV cache always scans.

    ``lora``: low-rank adapters (``LoraConfig``), held in their own params tree
    (``jaxalign.models.lora``); the base weights are the same with or without them.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None
    rope_local_theta: float | None = None
    norm_plus_one: bool = False
    post_norms: bool = False
    embed_scale: bool = False
    activation: str = "silu"
    query_pre_attn_scalar: int | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    max_seq_len: int = 4096
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    layer_loop: str = "auto"
    lora: LoraConfig | None = None

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must be a multiple of "
                f"n_kv_heads={self.n_kv_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelConfig.sliding_window={self.sliding_window}; expected >= 1")
        if self.sliding_window_pattern is not None and (
            self.sliding_window is None or self.sliding_window_pattern < 1
        ):
            raise ValueError(
                f"ModelConfig.sliding_window_pattern={self.sliding_window_pattern}; expected an "
                "integer >= 1 together with a sliding_window"
            )
        if self.attention not in ATTENTIONS:
            raise ValueError(
                f"ModelConfig.attention={self.attention!r}; expected one of {ATTENTIONS}"
            )
        if self.layer_loop not in LAYER_LOOPS:
            raise ValueError(
                f"ModelConfig.layer_loop={self.layer_loop!r}; expected one of {LAYER_LOOPS}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"ModelConfig.activation={self.activation!r}; expected one of {ACTIVATIONS}"
            )
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ModelConfig.{name}={value}; expected a positive number or None")

    def replace(self, **changes) -> ModelConfig:
        """Returns a copy with ``changes`` applied (e.g. ``dtype="bfloat16"``, ``remat="full"``)."""
        return dataclasses.replace(self, **changes)


def local_layers(config: ModelConfig) -> np.ndarray:
    """``[L]`` bool: which layers use the sliding window (see ``ModelConfig``)."""
    if config.sliding_window is None:
        return np.zeros(config.n_layers, bool)
    if config.sliding_window_pattern is None:
        return np.ones(config.n_layers, bool)
    return (np.arange(config.n_layers) + 1) % config.sliding_window_pattern != 0


def _gemma(**fields) -> ModelConfig:
    """A Gemma 2/3 decoder: the options every Gemma shares, plus ``fields``."""
    return ModelConfig(
        norm_plus_one=True,
        post_norms=True,
        embed_scale=True,
        activation="gelu_tanh",
        tie_embeddings=True,
        norm_eps=1e-6,
        **fields,
    )


_LLAMA31_SCALING = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)

PRESETS: dict[str, ModelConfig] = {
    # Tiny presets for tests and CPU smoke runs.
    "tiny-64": ModelConfig(
        vocab_size=512,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_ff=128,
        max_seq_len=512,
    ),
    "tiny-qwen2": ModelConfig(
        vocab_size=512,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_ff=128,
        rope_theta=1e6,
        norm_eps=1e-6,
        qkv_bias=True,
        tie_embeddings=True,
        max_seq_len=512,
    ),
    "tiny-qwen3": ModelConfig(
        vocab_size=512,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        d_ff=128,
        rope_theta=1e6,
        norm_eps=1e-6,
        qk_norm=True,
        max_seq_len=512,
    ),
    "tiny-gemma2": _gemma(
        vocab_size=512,
        d_model=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_ff=128,
        query_pre_attn_scalar=24,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        sliding_window=4,
        sliding_window_pattern=2,
        max_seq_len=512,
    ),
    "tiny-gemma3": _gemma(
        vocab_size=512,
        d_model=64,
        n_layers=6,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_ff=128,
        qk_norm=True,
        query_pre_attn_scalar=24,
        rope_theta=1e6,
        rope_scaling=RopeScaling(factor=8.0, rope_type="linear"),
        rope_local_theta=10000.0,
        sliding_window=4,
        sliding_window_pattern=3,
        max_seq_len=512,
    ),
    # meta-llama/Llama-2-7b-hf
    "llama2-7b": ModelConfig(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        d_ff=11008,
        rope_theta=10000.0,
        norm_eps=1e-5,
        max_seq_len=4096,
    ),
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        rope_theta=500000.0,
        norm_eps=1e-5,
        max_seq_len=8192,
    ),
    # meta-llama/Llama-3.2-1B (tied embeddings; the ~1B model of the GPU device suite)
    "llama3.2-1b": ModelConfig(
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        norm_eps=1e-5,
        tie_embeddings=True,
        max_seq_len=131072,
    ),
    # meta-llama/Llama-3.1-70B
    "llama3.1-70b": ModelConfig(
        vocab_size=128256,
        d_model=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        head_dim=128,
        d_ff=28672,
        rope_theta=500000.0,
        rope_scaling=_LLAMA31_SCALING,
        norm_eps=1e-5,
        max_seq_len=131072,
    ),
    # mistralai/Mistral-7B-v0.3 (config.json: "sliding_window": null; v0.1 used 4096)
    "mistral-7b": ModelConfig(
        vocab_size=32768,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        rope_theta=1e6,
        norm_eps=1e-5,
        max_seq_len=32768,
    ),
    # Qwen/Qwen2.5-0.5B ("use_sliding_window": false)
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151936,
        d_model=896,
        n_layers=24,
        n_heads=14,
        n_kv_heads=2,
        head_dim=64,
        d_ff=4864,
        rope_theta=1e6,
        norm_eps=1e-6,
        tie_embeddings=True,
        qkv_bias=True,
        max_seq_len=32768,
    ),
    # Qwen/Qwen2.5-7B
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064,
        d_model=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        head_dim=128,
        d_ff=18944,
        rope_theta=1e6,
        norm_eps=1e-6,
        qkv_bias=True,
        max_seq_len=131072,
    ),
    # Qwen/Qwen3-0.6B
    "qwen3-0.6b": ModelConfig(
        vocab_size=151936,
        d_model=1024,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        head_dim=128,
        d_ff=3072,
        rope_theta=1e6,
        norm_eps=1e-6,
        tie_embeddings=True,
        qk_norm=True,
        max_seq_len=40960,
    ),
    # Qwen/Qwen3-8B
    "qwen3-8b": ModelConfig(
        vocab_size=151936,
        d_model=4096,
        n_layers=36,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=12288,
        rope_theta=1e6,
        norm_eps=1e-6,
        qk_norm=True,
        max_seq_len=40960,
    ),
    # google/gemma-2-2b
    "gemma2-2b": _gemma(
        vocab_size=256000,
        d_model=2304,
        n_layers=26,
        n_heads=8,
        n_kv_heads=4,
        head_dim=256,
        d_ff=9216,
        query_pre_attn_scalar=256,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        sliding_window=4096,
        sliding_window_pattern=2,
        max_seq_len=8192,
    ),
    # google/gemma-2-9b
    "gemma2-9b": _gemma(
        vocab_size=256000,
        d_model=3584,
        n_layers=42,
        n_heads=16,
        n_kv_heads=8,
        head_dim=256,
        d_ff=14336,
        query_pre_attn_scalar=256,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        sliding_window=4096,
        sliding_window_pattern=2,
        max_seq_len=8192,
    ),
    # google/gemma-3-1b-pt
    "gemma3-1b": _gemma(
        vocab_size=262144,
        d_model=1152,
        n_layers=26,
        n_heads=4,
        n_kv_heads=1,
        head_dim=256,
        d_ff=6912,
        qk_norm=True,
        query_pre_attn_scalar=256,
        rope_theta=1e6,
        rope_local_theta=10000.0,
        sliding_window=512,
        sliding_window_pattern=6,
        max_seq_len=32768,
    ),
    # google/gemma-3-4b-pt, the language model (text_config; the vision tower is not included)
    "gemma3-4b": _gemma(
        vocab_size=262208,
        d_model=2560,
        n_layers=34,
        n_heads=8,
        n_kv_heads=4,
        head_dim=256,
        d_ff=10240,
        qk_norm=True,
        query_pre_attn_scalar=256,
        rope_theta=1e6,
        rope_scaling=RopeScaling(factor=8.0, rope_type="linear"),
        rope_local_theta=10000.0,
        sliding_window=1024,
        sliding_window_pattern=6,
        max_seq_len=131072,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` with optional field ``overrides`` (e.g. ``dtype="bfloat16"``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    config = PRESETS[name]
    return config.replace(**overrides) if overrides else config
