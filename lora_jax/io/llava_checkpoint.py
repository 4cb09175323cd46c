"""Loading a LLaVA checkpoint (vision tower, projector, language model) from a Hugging Face directory."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from lora_jax.errors import CheckpointError
from lora_jax.io.hf_checkpoint import HFCheckpoint, load_hf_model
from lora_jax.model.llava import Llava, LlavaConfig, llava_config_from_hf
from lora_jax.model.transformer import RuntimeOptions
from lora_jax.model.vision import VisionConfig


def _vision_tensors(cfg: VisionConfig) -> dict[str, str]:
    """Our vision/projector parameter path -> the canonical checkpoint tensor name (hf_checkpoint)."""
    t = "vision_tower."
    names = {
        "vision.patch_kernel": t + "embeddings.patch_embedding.weight",
        "vision.position_embedding": t + "embeddings.position_embedding.weight",
    }
    if cfg.kind == "siglip":
        names["vision.patch_bias"] = t + "embeddings.patch_embedding.bias"
    else:
        names["vision.class_embedding"] = t + "embeddings.class_embedding"
        names["vision.pre_norm_scale"] = t + "pre_layrnorm.weight"
        names["vision.pre_norm_bias"] = t + "pre_layrnorm.bias"
    return names


_LAYER_TENSORS = {
    "ln1_scale": "layer_norm1.weight",
    "ln1_bias": "layer_norm1.bias",
    "ln2_scale": "layer_norm2.weight",
    "ln2_bias": "layer_norm2.bias",
    "q_kernel": "self_attn.q_proj.weight",
    "k_kernel": "self_attn.k_proj.weight",
    "v_kernel": "self_attn.v_proj.weight",
    "o_kernel": "self_attn.out_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.out_proj.bias",
    "fc1_kernel": "mlp.fc1.weight",
    "fc1_bias": "mlp.fc1.bias",
    "fc2_kernel": "mlp.fc2.weight",
    "fc2_bias": "mlp.fc2.bias",
}


def _read(ckpt, name: str) -> np.ndarray:
    if not ckpt.has(name):
        raise CheckpointError(
            f"{ckpt.dir}: tensor {name} is missing: the checkpoint has no complete vision tower / projector "
            "(a LLaVA checkpoint is needed for the image datasets)"
        )
    return np.asarray(ckpt.read(name), np.float32)


def _tower_arrays(ckpt, cfg: LlavaConfig) -> dict[str, np.ndarray]:
    """Every vision/projector parameter of ours, read from the checkpoint (torch layouts transposed)."""
    v = cfg.vision
    out = {}
    for ours, name in _vision_tensors(v).items():
        x = _read(ckpt, name)
        out[ours] = x.transpose(2, 3, 1, 0) if ours == "vision.patch_kernel" else x  # [d,c,p,p] -> [p,p,c,d]
    for ours, suffix in _LAYER_TENSORS.items():
        rows = [_read(ckpt, f"vision_tower.encoder.layers.{i}.{suffix}") for i in range(v.num_layers)]
        out[f"vision.layers.{ours}"] = np.stack([r.T if ours.endswith("_kernel") else r for r in rows])
    out["projector.kernel_1"] = _read(ckpt, "multi_modal_projector.linear_1.weight").T
    out["projector.kernel_2"] = _read(ckpt, "multi_modal_projector.linear_2.weight").T
    if cfg.projector_bias:
        out["projector.bias_1"] = _read(ckpt, "multi_modal_projector.linear_1.bias")
        out["projector.bias_2"] = _read(ckpt, "multi_modal_projector.linear_2.bias")
    return out


def load_llava(hf_dir: str, lora, options: RuntimeOptions, mesh, seed: int = 0, ckpt=None) -> Llava:
    """A LLaVA checkpoint directory -> our Llava (the decoder sharded as load_hf_model shards it, the
    small tower and projector replicated), with fresh adapters on the decoder."""

    ckpt = ckpt or HFCheckpoint(hf_dir)
    if not ckpt.is_llava:
        raise CheckpointError(
            f"{hf_dir}/config.json: model_type {ckpt.raw_config.get('model_type')!r} has no vision tower "
            "(the image datasets need a LLaVA checkpoint, model_type 'llava')"
        )
    cfg = llava_config_from_hf(ckpt.raw_config, ckpt.config, f"{hf_dir}/config.json")
    language = load_hf_model(hf_dir, lora, options, mesh, seed=seed, ckpt=ckpt)
    model = nnx.eval_shape(lambda: Llava(cfg, lora, options, rngs=nnx.Rngs(0)))
    model.language = language
    arrays = _tower_arrays(ckpt, cfg)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[0] == "language":
            continue
        key = ".".join(str(p) for p in path)
        want = var.get_value()
        value = arrays[key]
        if value.shape != want.shape:
            raise CheckpointError(f"{hf_dir}: {key} has shape {value.shape}, config.json implies {want.shape}")
        var.set_value(jax.device_put(value.astype(want.dtype), replicated))
    return model
