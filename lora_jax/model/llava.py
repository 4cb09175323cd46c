"""LLaVA: a vision tower + projector (vision.py) joined to the Llama-family decoder (transformer.py), as
Hugging Face's `LlavaForConditionalGeneration` joins them.

The prompt holds one image placeholder token (`image_token_id`) per image feature; the projected
features of the batch's images replace those placeholders' input embeddings in order (row-major),
and the decoder runs on the result. LoRA lives on the language model exactly as for text (the
study adapted the LLM's sublayers); the tower and projector are frozen `nnx.Param`s.

`lora_jax.io.llava_checkpoint.load_llava(hf_dir, …)` reads a local Hugging Face LLaVA checkpoint (e.g. the
llava-hf/llava-interleave-qwen-0.5b-hf layout: SigLIP + Qwen2; or CLIP + Llama), in either tensor
layout transformers writes (language_model.model.… or model.language_model.…).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.errors import CheckpointError
from lora_jax.model.config import ModelConfig
from lora_jax.model.transformer import RuntimeOptions, Transformer
from lora_jax.model.vision import Projector, VisionConfig, VisionTower, vision_config_from_hf


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig
    text: ModelConfig
    image_token_id: int
    feature_layer: int = -2
    select_strategy: str = "default"  # "default": drop the class token; "full": keep every position
    projector_act: str = "gelu"
    projector_bias: bool = True

    def __post_init__(self):
        if self.select_strategy not in ("default", "full"):
            raise CheckpointError(f"vision_feature_select_strategy {self.select_strategy!r} (valid: default, full)")

    @property
    def tokens_per_image(self) -> int:
        """Image placeholder tokens (= features) per image."""
        drop = 1 if self.select_strategy == "default" else 0
        return self.vision.num_positions - drop


def llava_config_from_hf(raw: dict, text: ModelConfig, source: str) -> LlavaConfig:
    if not isinstance(raw.get("vision_config"), dict):
        raise CheckpointError(f"{source}: a llava config needs a vision_config object")
    layer = raw.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"{source}: vision_feature_layer {layer!r}: only one layer is supported")
    token = raw.get("image_token_id", raw.get("image_token_index", 32000))
    return LlavaConfig(
        vision=vision_config_from_hf(raw["vision_config"], f"{source} vision_config"),
        text=text,
        image_token_id=int(token),
        feature_layer=layer,
        select_strategy=raw.get("vision_feature_select_strategy", "default"),
        projector_act=raw.get("projector_hidden_act", "gelu"),
        projector_bias=bool(raw.get("multimodal_projector_bias", True)),
    )


class Llava(nnx.Module):
    """Vision tower + projector + the decoder (`self.language`, a Transformer with the LoRA adapters)."""

    def __init__(self, cfg: LlavaConfig, lora=None, options=RuntimeOptions(), *, rngs: nnx.Rngs):
        self.llava_config = cfg
        self.vision = VisionTower(cfg.vision, options.param_dtype, rngs=rngs)
        self.projector = Projector(
            cfg.vision.hidden_size,
            cfg.text.hidden_size,
            cfg.projector_act,
            cfg.projector_bias,
            options.param_dtype,
            rngs=rngs,
        )
        self.language = Transformer(cfg.text, lora, options, rngs=rngs)

    def image_features(self, pixels: jax.Array) -> jax.Array:
        """[images, H, W, C] -> projected features [images, tokens_per_image, text hidden] (float32)."""
        cfg = self.llava_config
        h = self.vision.hidden_state(pixels, cfg.feature_layer)
        if cfg.select_strategy == "default":
            h = h[:, 1:]
        return self.projector(h)

    def input_embeds(self, tokens: jax.Array, pixels: jax.Array | None) -> jax.Array:
        """The tokens' embeddings [batch, time, embed] with each row's images' features in that row's
        placeholders, in order. pixels: [batch, images per row, H, W, C] (a row with fewer images
        has padding images, which no placeholder reads)."""
        embeds = self.language.embed_tokens(tokens)
        if pixels is None:
            return embeds
        b, n = pixels.shape[:2]
        feats = self.image_features(pixels.reshape((b * n,) + pixels.shape[2:]))
        feats = feats.reshape(b, -1, embeds.shape[-1]).astype(embeds.dtype)  # [batch, n * tokens_per_image, embed]
        is_image = tokens == self.llava_config.image_token_id
        index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, feats.shape[1] - 1)  # k-th placeholder: feature k
        picked = jnp.take_along_axis(feats, index[..., None], axis=1)
        return jnp.where(is_image[..., None], picked, embeds)

    def hidden_states(self, tokens, positions=None, segment_ids=None, *, pixels=None, **kwargs):
        """As Transformer.hidden_states, with each row's images (pixels [batch, images, H, W, C]) in its
        placeholders (data/sft.py checks on the host that every example has one placeholder run per image)."""
        return self.language.hidden_states(
            tokens, positions, segment_ids, embeds=self.input_embeds(tokens, pixels), **kwargs
        )

    # The decoder's interface, so that training and generation take a Llava where they take a Transformer.
    @property
    def config(self) -> ModelConfig:
        return self.language.config

    @property
    def options(self) -> RuntimeOptions:
        return self.language.options

    @property
    def lora(self):
        return self.language.lora

    def lm_head_weight(self):
        return self.language.lm_head_weight()

    @property
    def logit_softcap(self):
        return self.language.logit_softcap

    def logits_from_hidden(self, hidden):
        return self.language.logits_from_hidden(hidden)

    def check_length(self, length: int) -> None:
        self.language.check_length(length)

    def __call__(self, tokens, positions=None, segment_ids=None, *, pixels=None):
        h, _ = self.hidden_states(tokens, positions, segment_ids, pixels=pixels)
        return self.language.logits_from_hidden(h)


# -- loading ------------------------------------------------------------------------------------
