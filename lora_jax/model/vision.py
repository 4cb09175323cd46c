"""The LLaVA vision side in Flax NNX: a SigLIP or CLIP ViT encoder and the multimodal projector.

As Hugging Face's `LlavaForConditionalGeneration`: the image is cut into patch_size² patches (the
patch convolution as one matmul), position embeddings are added (CLIP also prepends a class token
and applies `pre_layrnorm`), pre-LN encoder layers run under `jax.lax.scan`, and the features are the
hidden states after `vision_feature_layer` layers (hidden state 0 = the embeddings; -1 = the last
layer, -2 the one before), without the class token when the select strategy is "default". Only the
layers up to that one are computed. The projector is linear - act - linear.

Pixels are [images, height, width, channels] float32, already resized and normalised
(data/image_processing.py). The tower and projector are frozen `nnx.Param`s.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.errors import CheckpointError
from lora_jax.model import init as initial

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    kind: str  # "siglip" | "clip"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        if self.kind not in ("siglip", "clip"):
            raise CheckpointError(f"vision tower {self.kind!r} is not supported (siglip, clip)")
        if self.hidden_act not in ACTIVATIONS:
            raise CheckpointError(f"vision hidden_act {self.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def class_token(self) -> bool:
        return self.kind == "clip"

    @property
    def num_positions(self) -> int:
        return self.grid**2 + (1 if self.class_token else 0)


# Hugging Face's defaults for fields a saved config may leave out.
_HF_DEFAULTS = {
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
}  # fmt: skip


def vision_config_from_hf(d: dict, source: str) -> VisionConfig:
    model_type = d.get("model_type", "")
    kind = "siglip" if "siglip" in model_type else "clip" if "clip" in model_type else model_type
    if kind not in _HF_DEFAULTS:
        raise CheckpointError(f"{source}: vision_config.model_type {model_type!r} is not supported (SigLIP, CLIP)")
    v = dict(_HF_DEFAULTS[kind], **{k: d[k] for k in _HF_DEFAULTS[kind] if k in d})
    return VisionConfig(
        kind=kind,
        hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"],
        num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"],
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        num_channels=v["num_channels"],
        layer_norm_eps=float(v["layer_norm_eps"]),
        hidden_act=v["hidden_act"],
    )


def _param(shape, rngs, dtype, scale=0.02):
    return nnx.Param(initial.normal(rngs.params(), shape, dtype, scale))


def _ones(shape, dtype):
    return nnx.Param(initial.constant(1.0, shape, dtype))


def _zeros(shape, dtype):
    return nnx.Param(initial.constant(0.0, shape, dtype))


class VisionTower(nnx.Module):
    """SigLIP / CLIP vision encoder; parameters of all layers stacked on a leading axis."""

    def __init__(self, cfg: VisionConfig, param_dtype=jnp.float32, *, rngs: nnx.Rngs):
        self.config = cfg
        d, m, n, p, c = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.patch_size, cfg.num_channels
        self.patch_kernel = _param((p, p, c, d), rngs, param_dtype)  # torch conv [d, c, p, p] transposed
        self.patch_bias = _zeros((d,), param_dtype) if cfg.kind == "siglip" else None
        self.class_embedding = _param((d,), rngs, param_dtype) if cfg.class_token else None
        self.position_embedding = _param((cfg.num_positions, d), rngs, param_dtype)
        self.pre_norm_scale = _ones((d,), param_dtype) if cfg.kind == "clip" else None
        self.pre_norm_bias = _zeros((d,), param_dtype) if cfg.kind == "clip" else None
        self.layers = nnx.data(
            {
                "ln1_scale": _ones((n, d), param_dtype),
                "ln1_bias": _zeros((n, d), param_dtype),
                "ln2_scale": _ones((n, d), param_dtype),
                "ln2_bias": _zeros((n, d), param_dtype),
                **{f"{w}_kernel": _param((n, d, d), rngs, param_dtype) for w in "qkvo"},
                **{f"{w}_bias": _zeros((n, d), param_dtype) for w in "qkvo"},
                "fc1_kernel": _param((n, d, m), rngs, param_dtype),
                "fc1_bias": _zeros((n, m), param_dtype),
                "fc2_kernel": _param((n, m, d), rngs, param_dtype),
                "fc2_bias": _zeros((n, d), param_dtype),
            }
        )

    def embeddings(self, pixels: jax.Array) -> jax.Array:
        """[images, H, W, C] -> [images, positions, hidden] (hidden state 0)."""
        cfg = self.config
        n, p, g = pixels.shape[0], cfg.patch_size, cfg.grid
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"pixels of shape {pixels.shape[1:]}; the tower takes {cfg.image_size}x{cfg.image_size}x{cfg.num_channels}"
            )
        patches = pixels.reshape(n, g, p, g, p, cfg.num_channels).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, -1)
        kernel = self.patch_kernel.get_value().astype(jnp.float32).reshape(-1, cfg.hidden_size)
        h = jnp.einsum("npk,kd->npd", patches.astype(jnp.float32), kernel)
        if self.patch_bias is not None:
            h = h + self.patch_bias.get_value().astype(jnp.float32)
        if self.class_embedding is not None:
            cls = jnp.broadcast_to(self.class_embedding.get_value().astype(jnp.float32), (n, 1, cfg.hidden_size))
            h = jnp.concatenate([cls, h], axis=1)
        h = h + self.position_embedding.get_value().astype(jnp.float32)
        if self.pre_norm_scale is not None:
            h = layer_norm(h, self.pre_norm_scale.get_value(), self.pre_norm_bias.get_value(), cfg.layer_norm_eps)
        return h

    def hidden_state(self, pixels: jax.Array, layer: int) -> jax.Array:
        """Hugging Face's `hidden_states[layer]` of the tower (negative counts from the end)."""
        cfg = self.config
        depth = layer if layer >= 0 else cfg.num_layers + 1 + layer
        if not 0 <= depth <= cfg.num_layers:
            raise CheckpointError(f"vision_feature_layer={layer}: the tower has {cfg.num_layers} layers")
        h = self.embeddings(pixels)
        params = {k: v.get_value()[:depth] for k, v in self.layers.items()}
        if depth:
            h, _ = jax.lax.scan(lambda h, p: (_encoder_layer(cfg, h, p), None), h, params)
        return h


def layer_norm(x, scale, bias, eps):
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def _dense(x, p, name):
    return jnp.einsum("...i,io->...o", x, p[f"{name}_kernel"].astype(jnp.float32)) + p[f"{name}_bias"].astype(
        jnp.float32
    )


def _encoder_layer(cfg: VisionConfig, h, p):
    n, s, d = h.shape
    heads, hd = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    x = layer_norm(h, p["ln1_scale"], p["ln1_bias"], cfg.layer_norm_eps)
    q, k, v = (_dense(x, p, w).reshape(n, s, heads, hd) for w in "qkv")
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) * hd**-0.5  # bidirectional: every patch sees every patch
    attn = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(scores, axis=-1), v).reshape(n, s, d)
    h = h + _dense(attn, p, "o")
    x = layer_norm(h, p["ln2_scale"], p["ln2_bias"], cfg.layer_norm_eps)
    return h + _dense(ACTIVATIONS[cfg.hidden_act](_dense(x, p, "fc1")), p, "fc2")


class Projector(nnx.Module):
    """LLaVA's multimodal projector: linear_1 - act - linear_2, vision width -> text width."""

    def __init__(self, vision_size: int, text_size: int, act: str, bias: bool, param_dtype=jnp.float32, *, rngs):
        if act not in ACTIVATIONS:
            raise CheckpointError(f"projector_hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)})")
        self.act = act
        self.kernel_1 = _param((vision_size, text_size), rngs, param_dtype)
        self.kernel_2 = _param((text_size, text_size), rngs, param_dtype)
        self.bias_1 = _zeros((text_size,), param_dtype) if bias else None
        self.bias_2 = _zeros((text_size,), param_dtype) if bias else None

    def __call__(self, x):
        x = jnp.einsum("...i,io->...o", x.astype(jnp.float32), self.kernel_1.get_value().astype(jnp.float32))
        if self.bias_1 is not None:
            x = x + self.bias_1.get_value().astype(jnp.float32)
        x = ACTIVATIONS[self.act](x)
        x = jnp.einsum("...i,io->...o", x, self.kernel_2.get_value().astype(jnp.float32))
        if self.bias_2 is not None:
            x = x + self.bias_2.get_value().astype(jnp.float32)
        return x
