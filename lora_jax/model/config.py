"""Model hyper-parameters, and parsing of Hugging Face `config.json` in every form users have.

Real Hub checkpoints carry the legacy `rope_theta` + `rope_scaling` (keyed `type` or
`rope_type`); transformers 5.x writes `rope_parameters` (per layer type for Gemma 3). All map to
one `ModelConfig`.

Families: Llama 3, Qwen2/2.5, Mistral (the Llama block); Qwen3 (+ per-head RMSNorm on queries and
keys); Gemma 3 text (`gemma3_text`, and the language model of `gemma3` checkpoints: (1 + w) norms,
norms before and after attention and the MLP, GeGLU, embeddings scaled by sqrt(hidden),
`query_pre_attn_scalar`, sliding layers with their own RoPE base, final logit soft-capping).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lora_jax.errors import CheckpointError, ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3", "gemma3_text", "gemma3")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    # llama3 and linear scaling (linear: every inverse frequency divided by factor).
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    rope: RopeConfig = RopeConfig()
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    # Per-layer sliding window size (None = full causal attention for that layer).
    sliding_windows: tuple[int | None, ...] = ()
    model_type: str = "llama"
    # Std of a random base's normal draws (kernels, embedding, LM head), transformers' name for it. Not in
    # the repr: a random base's fingerprint (run/assemble.py) names it only when it is not the default.
    initializer_range: float = dataclasses.field(default=0.02, repr=False)
    # Family features beyond the Llama block. Not in the repr either: a random base's fingerprint adds
    # `family_repr` (which names only those that differ from Llama's), so older fingerprints stay.
    qk_norm: bool = dataclasses.field(default=False, repr=False)  # RMSNorm over head_dim on q and k (Qwen3, Gemma 3)
    gemma_norms: bool = dataclasses.field(default=False, repr=False)  # (1 + w) RMSNorms, pre+post around attn/MLP
    hidden_act: str = dataclasses.field(default="silu", repr=False)  # the MLP gate's activation
    embed_scale: bool = dataclasses.field(default=False, repr=False)  # embeddings x sqrt(hidden) (Gemma)
    query_pre_attn_scalar: float | None = dataclasses.field(default=None, repr=False)  # scale = this^-1/2
    final_logit_softcap: float | None = dataclasses.field(default=None, repr=False)  # cap * tanh(logits / cap)
    rope_local: RopeConfig | None = dataclasses.field(default=None, repr=False)  # RoPE of the sliding layers
    # Where the decoder's tensors sit in the Hugging Face checkpoint (and PEFT's module paths):
    # "model." for a causal LM, "model.language_model." inside a multimodal wrapper (gemma3).
    hf_prefix: str = dataclasses.field(default="model.", repr=False)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise ConfigError(
                f"sliding_windows has {len(self.sliding_windows)} entries, expected num_layers={self.num_layers}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def window_for_layer(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    @property
    def has_sliding_window(self) -> bool:
        return any(w is not None for w in self.sliding_windows)

    @property
    def window_kinds(self) -> tuple[int | None, ...]:
        """The distinct attention windows of the layers (None = full attention), in a fixed order: the
        layer scan picks each layer's kind by index, so every kind is compiled with a static window."""
        kinds = set(self.sliding_windows) if self.sliding_windows else {None}
        return tuple(sorted(kinds, key=lambda w: -1 if w is None else w))

    def window_kind_of_layer(self, layer: int) -> int:
        return self.window_kinds.index(self.window_for_layer(layer))

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def family_repr(self) -> str:
        """The family features that differ from the Llama block ("" for Llama, Qwen2 and Mistral)."""
        base = ModelConfig(1, 1, 1, 1, 1, 1, 1)
        names = ("qk_norm", "gemma_norms", "hidden_act", "embed_scale", "query_pre_attn_scalar")
        names += ("final_logit_softcap", "rope_local", "hf_prefix")
        return " ".join(f"{n}={getattr(self, n)!r}" for n in names if getattr(self, n) != getattr(base, n))


def _rope_from_params(merged: dict[str, Any], cfg: dict[str, Any], source: str, theta_default: float) -> RopeConfig:
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = float(merged.get("rope_theta", cfg.get("rope_theta", theta_default)))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "linear":
        if "factor" not in merged:
            raise CheckpointError(f"{source}: linear rope scaling is missing factor")
        return RopeConfig(theta=theta, rope_type="linear", factor=float(merged["factor"]))
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in merged]
    if missing:
        raise CheckpointError(f"{source}: llama3 rope scaling is missing {', '.join(missing)}")
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(merged["factor"]),
        low_freq_factor=float(merged["low_freq_factor"]),
        high_freq_factor=float(merged["high_freq_factor"]),
        original_max_position_embeddings=int(
            merged.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))
        ),
    )


def _rope_dicts(cfg: dict[str, Any], source: str) -> tuple[dict | None, dict | None]:
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"{source}: 'rope_parameters' must be an object, got {params!r}")
    return params, cfg.get("rope_scaling")


def _rope_from_hf(cfg: dict[str, Any], source: str) -> RopeConfig:
    params, legacy = _rope_dicts(cfg, source)
    if params is not None and any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{source}: per-layer-type 'rope_parameters' are not supported for {cfg['model_type']}")
    merged: dict[str, Any] = {}
    if legacy:
        merged.update(legacy)
    if params:
        merged.update(params)
    return _rope_from_params(merged, cfg, source, 10000.0)


def _gemma3_ropes(cfg: dict[str, Any], source: str) -> tuple[RopeConfig, RopeConfig]:
    """(full-attention RoPE, sliding-layer RoPE) merged in the order transformers' Gemma3TextConfig
    (convert_rope_params_to_dict) merges them: the per-layer-type `rope_parameters` (a flat one is
    ignored), a legacy `rope_scaling` updating the full-attention entry, then rope_theta and
    rope_local_base_freq as each entry's default theta."""
    params, legacy = _rope_dicts(cfg, source)
    params = params or {}
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    if legacy:
        full.update(legacy)
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", cfg.get("rope_local_base_freq", GEMMA3_LOCAL_THETA))
    return (
        _rope_from_params(full, {}, f"{source} (full_attention)", 1_000_000.0),
        _rope_from_params(local, {}, f"{source} (sliding_attention)", GEMMA3_LOCAL_THETA),
    )


def _layer_types(cfg: dict[str, Any], num_layers: int, source: str, default: list[str]) -> list[str]:
    layer_types = cfg.get("layer_types") or default
    if len(layer_types) != num_layers:
        raise CheckpointError(f"{source}: layer_types has {len(layer_types)} entries, expected {num_layers}")
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise CheckpointError(f"{source}: unknown layer_types {sorted(unknown)}")
    return layer_types


def _sliding_windows_from_hf(cfg: dict[str, Any], num_layers: int, source: str):
    model_type = cfg["model_type"]
    window = cfg.get("sliding_window")
    if model_type == "mistral":
        return (int(window),) * num_layers if window else ()
    if model_type in ("qwen2", "qwen3"):
        # As transformers does: the window applies only when use_sliding_window is set, and then
        # on the layers that layer_types (or max_window_layers) marks as sliding.
        if not cfg.get("use_sliding_window", False) or not window:
            return ()
        start = int(cfg.get("max_window_layers", num_layers))
        default = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
    elif model_type == "gemma3_text":
        # Gemma3TextConfig: every `sliding_window_pattern`-th layer (default 6) is global, the rest slide.
        pattern = int(cfg.get("sliding_window_pattern", 6))
        default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
        if not window:
            raise CheckpointError(f"{source}: a gemma3 config needs sliding_window")
    else:
        return ()
    layer_types = _layer_types(cfg, num_layers, source, default)
    windows = tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    return windows if any(w is not None for w in windows) else ()


GEMMA3_LOCAL_THETA = 10_000.0
# transformers' Gemma3TextConfig defaults: a Hub gemma3 config.json often leaves these out of its
# text_config (e.g. gemma-3-4b names only the sizes, rope_scaling and sliding_window).
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
}
# transformers' Qwen3Config defaults (head_dim is its own setting, not hidden_size / heads).
QWEN3_DEFAULTS = {
    "vocab_size": 151_936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 128,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "sliding_window": 4096,
    "max_window_layers": 28,
}


def model_config_from_hf(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Parses a Hugging Face config dict (legacy or transformers-5 form) into a `ModelConfig`.

    A `gemma3` (multimodal) config is read as its language model (text_config); the vision tower is
    not loaded, and the decoder's tensors are found under model.language_model."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        more = " (Mixture-of-Experts models are not supported; dense qwen3 is)" if model_type == "qwen3_moe" else ""
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported{more}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "gemma3":
        text = cfg.get("text_config") or {}
        if not isinstance(text, dict):
            raise CheckpointError(f"{source}: a gemma3 config's text_config must be an object")
        parsed = model_config_from_hf(dict(text, model_type="gemma3_text"), f"{source} text_config")
        # transformers' Gemma3ForConditionalGeneration never soft-caps its logits (only Gemma3ForCausalLM
        # does; Hub checkpoints leave the cap null anyway): the wrapper's logits are uncapped here too.
        # It ties the LM head as the top-level config says (Gemma3Config.tie_word_embeddings), not text_config.
        tied = bool(cfg.get("tie_word_embeddings", True))
        return dataclasses.replace(
            parsed, hf_prefix="model.language_model.", final_logit_softcap=None, tie_word_embeddings=tied
        )
    if model_type == "gemma3_text":
        cfg = {**GEMMA3_TEXT_DEFAULTS, **cfg}
    elif model_type == "qwen3":
        cfg = {**QWEN3_DEFAULTS, **cfg}
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise CheckpointError(f"{source}: missing keys {', '.join(missing)}")
    num_heads = int(cfg["num_attention_heads"])
    num_layers = int(cfg["num_hidden_layers"])
    head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // num_heads
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor != 1 is not supported")
    gemma = model_type == "gemma3_text"
    act = cfg.get("hidden_activation") if gemma else cfg.get("hidden_act", "silu")
    if act not in ACTIVATIONS or (act != "silu") != gemma:
        raise CheckpointError(f"{source}: hidden activation {act!r} is not supported for {model_type}")
    if model_type == "llama" and cfg.get("mlp_bias", False):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported")
    if model_type in ("llama", "qwen3", "gemma3_text") and cfg.get("attention_bias", False):
        raise CheckpointError(
            f"{source}: attention_bias=true on {model_type} (which also biases o_proj) is not supported"
        )
    if gemma and cfg.get("attn_logit_softcapping") is not None:
        raise CheckpointError(f"{source}: attn_logit_softcapping is not supported (Gemma 3 checkpoints leave it null)")
    if gemma and cfg.get("use_bidirectional_attention"):
        raise CheckpointError(f"{source}: use_bidirectional_attention=true (an encoder) is not supported")
    if gemma and cfg.get("query_pre_attn_scalar") is None:
        raise CheckpointError(f"{source}: query_pre_attn_scalar must be a number, got null")
    qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
    rope, rope_local = _gemma3_ropes(cfg, source) if gemma else (_rope_from_hf(cfg, source), None)
    softcap = cfg.get("final_logit_softcapping")
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
        rope=rope,
        qkv_bias=qkv_bias,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        sliding_windows=_sliding_windows_from_hf(cfg, num_layers, source),
        model_type=model_type,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        gemma_norms=gemma,
        hidden_act=act,
        embed_scale=gemma,
        query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"]) if gemma else None,
        final_logit_softcap=float(softcap) if softcap is not None else None,
        rope_local=rope_local,
    )
