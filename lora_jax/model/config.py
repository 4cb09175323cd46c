"""Model hyper-parameters, and parsing of Hugging Face `config.json` in every form users have.

Real Hub checkpoints carry the legacy `rope_theta` + `rope_scaling` (keyed `type` or
`rope_type`); transformers 5.x writes `rope_parameters`. Both map to one `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lora_jax.errors import CheckpointError, ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    # llama3 scaling only.
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

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise ConfigError(
                f"sliding_windows has {len(self.sliding_windows)} entries, expected num_layers={self.num_layers}"
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def window_for_layer(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    @property
    def has_sliding_window(self) -> bool:
        return any(w is not None for w in self.sliding_windows)


def _rope_from_hf(cfg: dict[str, Any], source: str) -> RopeConfig:
    params = cfg.get("rope_parameters")
    legacy = cfg.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"{source}: 'rope_parameters' must be an object, got {params!r}")
    if params is not None and any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{source}: per-layer-type 'rope_parameters' are not supported")
    merged: dict[str, Any] = {}
    if legacy:
        merged.update(legacy)
    if params:
        merged.update(params)
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return RopeConfig(theta=theta)
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


def _sliding_windows_from_hf(cfg: dict[str, Any], num_layers: int, source: str):
    model_type = cfg["model_type"]
    window = cfg.get("sliding_window")
    if model_type == "mistral":
        return (int(window),) * num_layers if window else ()
    if model_type == "qwen2":
        # As transformers does: the window applies only when use_sliding_window is set, and then
        # on the layers that layer_types (or max_window_layers) marks as sliding.
        if not cfg.get("use_sliding_window", False) or not window:
            return ()
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            start = int(cfg.get("max_window_layers", num_layers))
            layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
        if len(layer_types) != num_layers:
            raise CheckpointError(f"{source}: layer_types has {len(layer_types)} entries, expected {num_layers}")
        unknown = set(layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise CheckpointError(f"{source}: unknown layer_types {sorted(unknown)}")
        windows = tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
        return windows if any(w is not None for w in windows) else ()
    return ()


def model_config_from_hf(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Parses a Hugging Face config dict (legacy or transformers-5 form) into a `ModelConfig`."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise CheckpointError(f"{source}: missing keys {', '.join(missing)}")
    num_heads = int(cfg["num_attention_heads"])
    num_layers = int(cfg["num_hidden_layers"])
    head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // num_heads
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor != 1 is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported (only 'silu')")
    if model_type == "llama" and cfg.get("mlp_bias", False):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported")
    qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
    if model_type == "llama" and cfg.get("attention_bias", False):
        raise CheckpointError(f"{source}: attention_bias=true on llama (which also biases o_proj) is not supported")
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
        rope=_rope_from_hf(cfg, source),
        qkv_bias=qkv_bias,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_windows=_sliding_windows_from_hf(cfg, num_layers, source),
        model_type=model_type,
    )
