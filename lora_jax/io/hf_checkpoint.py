"""Hugging Face checkpoints in (sharded, slice by slice) and merged checkpoints out.

Import builds the model abstractly (`nnx.eval_shape`) and creates every parameter already
sharded with `jax.make_array_from_callback`: each device's callback reads just its slice of the
memory-mapped safetensors (q/k/v and gate/up fused on the fly). No random init is overwritten and
no full host copy of the model is made.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lora_jax.errors import CheckpointError, MissingFileError
from lora_jax.io.safetensors_file import SafetensorsFile, write_safetensors
from lora_jax.lora.delta import delta_weight, init_lora_tensor
from lora_jax.lora.spec import LoraSpec
from lora_jax.model.config import ModelConfig, model_config_from_hf
from lora_jax.model.transformer import RuntimeOptions, Transformer
from lora_jax.sharding import variable_sharding

_LAYER = "model.layers.{}."


def hf_norm_names(cfg: ModelConfig) -> dict[str, str]:
    """Our per-layer norms -> their tensor names after 'model.layers.i.'. Gemma's post_attention_layernorm
    norms the attention output (our post_attn_norm); Llama's is the norm before the MLP (our mlp_norm)."""
    if cfg.gemma_norms:
        names = {
            "attn_norm": "input_layernorm.weight",
            "post_attn_norm": "post_attention_layernorm.weight",
            "mlp_norm": "pre_feedforward_layernorm.weight",
            "post_mlp_norm": "post_feedforward_layernorm.weight",
        }
    else:
        names = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight"}
    if cfg.qk_norm:
        names.update({"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"})
    return names


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this config holds, with its shape (the decoder's
    tensors by their causal-LM names: see `canonical_name` for a multimodal wrapper's)."""
    e, m, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hd, kd = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, e), "model.norm.weight": (e,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, e)
    for i in range(cfg.num_layers):
        p = _LAYER.format(i)
        for ours, name in hf_norm_names(cfg).items():
            shapes[p + name] = (d,) if ours in ("q_norm", "k_norm") else (e,)
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hd, e),
                p + "self_attn.k_proj.weight": (kd, e),
                p + "self_attn.v_proj.weight": (kd, e),
                p + "self_attn.o_proj.weight": (e, hd),
                p + "mlp.gate_proj.weight": (m, e),
                p + "mlp.up_proj.weight": (m, e),
                p + "mlp.down_proj.weight": (e, m),
            }
        )
        if cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (hd,), p + "self_attn.k_proj.bias": (kd,)})
            shapes[p + "self_attn.v_proj.bias"] = (kd,)
    return shapes


def canonical_name(key: str) -> str:
    """A LLaVA checkpoint's tensor name as the plain decoder's (model.layers.…, lm_head.…) or, for the
    vision side, vision_tower.… / multi_modal_projector.… — whichever layout transformers saved."""
    for old, new in (
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    return key.replace("vision_tower.vision_model.", "vision_tower.", 1)


WRAPPER_MODEL_TYPES = ("llava", "gemma3")  # a vision tower + a decoder under model.language_model


class HFCheckpoint:
    """A local Hugging Face checkpoint directory: config.json + *.safetensors (optionally indexed).

    A LLaVA or a multimodal Gemma 3 checkpoint is read as its language model (config.json's
    text_config); its tensors are addressed by `canonical_name`, and `is_llava` says that the LLaVA
    vision side is there (Gemma 3's vision tower is not read, only passed through a merged export)."""

    def __init__(self, hf_dir: str):
        self.dir = str(hf_dir)
        if not os.path.isdir(self.dir):
            raise MissingFileError(f"{self.dir}: Hugging Face checkpoint directory does not exist")
        self.config = load_hf_model_config(self.dir)
        with open(os.path.join(self.dir, "config.json")) as f:
            self.raw_config = json.load(f)
        self.is_llava = self.raw_config.get("model_type") == "llava"
        self.is_wrapped = self.raw_config.get("model_type") in WRAPPER_MODEL_TYPES
        index = os.path.join(self.dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.dir, "*.safetensors")))
            weight_map = None
        if not files:
            legacy = [p for p in os.listdir(self.dir) if p.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            if legacy:
                raise CheckpointError(
                    f"{self.dir}: only PyTorch pickle weights ({legacy[0]}); safetensors are required — convert "
                    "with transformers: AutoModelForCausalLM.from_pretrained(d).save_pretrained(d, safe_serialization=True)"
                )
            raise MissingFileError(f"{self.dir}: no *.safetensors weight files")
        self.files = {}
        for name in files:
            path = os.path.join(self.dir, name)
            if not os.path.exists(path):
                raise MissingFileError(f"{path}: listed in model.safetensors.index.json but missing")
            self.files[name] = SafetensorsFile(path)
        self.location, self.real_name = {}, {}
        for fname, f in self.files.items():
            for key in f.keys():
                if weight_map is None or weight_map.get(key) == fname:
                    name = canonical_name(key) if self.is_wrapped else key
                    self.location[name], self.real_name[name] = f, key
        self._validate()

    def _validate(self) -> None:
        for name, shape in hf_tensor_shapes(self.config).items():
            if name not in self.location:
                raise CheckpointError(f"{self.dir}: tensor {name} is missing from the checkpoint")
            got = self.shape(name)
            if got != shape:
                raise CheckpointError(
                    f"{self.location[name].path}: tensor {name} has shape {got}, but config.json implies {shape}"
                )

    def read(self, name: str, *index: slice) -> np.ndarray:
        """tensor[index] of one checkpoint tensor; only those bytes are read."""
        return self.location[name].read(self.real_name[name], *index)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.location[name].shape(self.real_name[name])

    def has(self, name: str) -> bool:
        return name in self.location

    def source_dtype(self) -> np.dtype:
        return self.location["model.embed_tokens.weight"].dtype(self.real_name["model.embed_tokens.weight"])

    def fingerprint(self) -> str:
        """Identifies the base weights cheaply: config + every tensor's name, shape, dtype and a few bytes."""
        h = hashlib.sha256(json.dumps(self.raw_config, sort_keys=True).encode())
        for name in sorted(self.real_name.values()):
            f = self.location[canonical_name(name) if self.is_wrapped else name]
            h.update(f"{name}{f.shape(name)}{f.dtype(name)}".encode())
            shape = f.shape(name)
            row = math.prod(shape[1:]) if shape else 1
            first = f.read(name, slice(0, min(shape[0], -(-64 // row)))) if shape else f.read(name)  # 64 values
            h.update(np.ascontiguousarray(first.reshape(-1)[:64]).tobytes())
        return h.hexdigest()[:16]


def _rows(s: slice, n: int) -> slice:
    """The rows of a [heads * n, ...] tensor that hold heads s (a step-1 slice)."""
    return slice(s.start * n, s.stop * n)


def _slice_reader(ckpt: HFCheckpoint, cfg: ModelConfig, path: tuple[str, ...]):
    """For one of our parameters: fn(layer | None, index_slices) -> numpy block of that parameter.

    Each HF tensor is read by a contiguous block of whole heads (a safetensors slice), then reshaped
    and narrowed to the head-dim slice, so a host reads little more than the block it holds."""
    g, d = cfg.q_per_kv, cfg.head_dim
    r = ckpt.read

    def attn(layer, name, *index):
        return r(_LAYER.format(layer) + f"self_attn.{name}", *index)

    def mlp(layer, name, *index):
        return r(_LAYER.format(layer) + f"mlp.{name}.weight", *index)

    if path == ("embed",):
        return lambda _, s: r("model.embed_tokens.weight", s[0], s[1])
    if path == ("lm_head",):
        return lambda _, s: r("lm_head.weight", s[0], s[1])
    if path == ("final_norm",):
        return lambda _, s: r("model.norm.weight", s[0])
    name = path[1:]
    norms = hf_norm_names(cfg)
    if len(name) == 1 and name[0] in norms:
        return lambda i, s: r(_LAYER.format(i) + norms[name[0]], s[0])
    if name == ("qkv", "kernel"):

        def qkv(i, s):
            es, ks, js, ds = s
            nk = ks.stop - ks.start
            q = attn(i, "q_proj.weight", _rows(ks, g * d), es).reshape(nk, g, d, -1)[:, :, ds]
            kk = attn(i, "k_proj.weight", _rows(ks, d), es).reshape(nk, d, -1)[:, ds][:, None]
            vv = attn(i, "v_proj.weight", _rows(ks, d), es).reshape(nk, d, -1)[:, ds][:, None]
            return np.concatenate([q, kk, vv], axis=1)[:, js].transpose(3, 0, 1, 2)

        return qkv
    if name == ("qkv", "bias"):

        def qkv_bias(i, s):
            ks, js, ds = s
            nk = ks.stop - ks.start
            q = attn(i, "q_proj.bias", _rows(ks, g * d)).reshape(nk, g, d)[:, :, ds]
            kk = attn(i, "k_proj.bias", _rows(ks, d)).reshape(nk, d)[:, ds][:, None]
            vv = attn(i, "v_proj.bias", _rows(ks, d)).reshape(nk, d)[:, ds][:, None]
            return np.concatenate([q, kk, vv], axis=1)[:, js]

        return qkv_bias
    if name == ("o_proj", "kernel"):

        def o_proj(i, s):
            ks, js, ds, es = s
            w = attn(i, "o_proj.weight", es, _rows(ks, g * d))
            return w.reshape(w.shape[0], ks.stop - ks.start, g, d)[:, :, js, ds].transpose(1, 2, 3, 0)

        return o_proj
    if name == ("fc1", "kernel"):

        def fc1(i, s):
            es, js, ms = s
            both = np.stack([mlp(i, "gate_proj", ms, es), mlp(i, "up_proj", ms, es)])[js]
            return both.transpose(2, 0, 1)

        return fc1
    if name == ("fc2", "kernel"):
        return lambda i, s: mlp(i, "down_proj", s[1], s[0]).T
    raise KeyError(f"no checkpoint tensor for parameter {'.'.join(path)}")


def _concrete(index, shape):
    return tuple(slice(*sl.indices(n)) for sl, n in zip(index, shape))


def load_hf_model(
    hf_dir: str,
    lora: LoraSpec | None,
    options: RuntimeOptions,
    mesh: Mesh,
    seed: int = 0,
    ckpt: HFCheckpoint | None = None,
) -> Transformer:
    """The model with base weights from `hf_dir`, created sharded on `mesh`, and fresh LoRA adapters."""
    ckpt = ckpt or HFCheckpoint(hf_dir)
    cfg = ckpt.config
    abstract = nnx.eval_shape(lambda: Transformer(cfg, lora, options, rngs=nnx.Rngs(seed)))
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        sharding = variable_sharding(var, mesh)
        if isinstance(var, nnx.LoRAParam):
            var.set_value(init_lora_tensor(path, shape, seed, sharding, zeros=path[-1] == "lora_b"))
            continue
        read = _slice_reader(ckpt, cfg, tuple(str(p) for p in path))
        stacked = path[0] == "layers"

        def callback(index, read=read, shape=shape, dtype=dtype, stacked=stacked):
            index = _concrete(index, shape)
            if not stacked:
                return np.asarray(read(None, index), dtype=dtype)
            layers = range(*index[0].indices(shape[0]))
            return np.stack([np.asarray(read(i, index[1:]), dtype=dtype) for i in layers])

        var.set_value(jax.make_array_from_callback(shape, sharding, callback))
    return abstract


# -- merged export -------------------------------------------------------------------------------


def merged_layer_kernels(model: Transformer, layer: int) -> dict[str, np.ndarray]:
    """Our fused kernels of one layer with the LoRA deltas folded in, as float32 numpy."""
    out = {}
    spec = None if model.merged else model.lora
    for name in ("qkv", "o_proj", "fc1", "fc2"):
        proj = getattr(model.layers, name)
        w = np.asarray(jax.device_get(proj.kernel[layer]), np.float32)
        if spec is not None and proj.lora_a is not None:
            delta = delta_weight(proj.lora_a[layer], proj.lora_b[layer])
            w = w + np.asarray(jax.device_get(delta)) * spec.scale_for(name)
        out[name] = w
    return out


def hf_tensors_of_layer(cfg: ModelConfig, kernels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fused kernels of one layer -> the Hugging Face weight tensors (suffixes after 'model.layers.i.')."""
    e, g = cfg.hidden_size, cfg.q_per_kv
    qkv, o, fc1, fc2 = kernels["qkv"], kernels["o_proj"], kernels["fc1"], kernels["fc2"]
    return {
        "self_attn.q_proj.weight": qkv[:, :, :g, :].reshape(e, -1).T,
        "self_attn.k_proj.weight": qkv[:, :, g, :].reshape(e, -1).T,
        "self_attn.v_proj.weight": qkv[:, :, g + 1, :].reshape(e, -1).T,
        "self_attn.o_proj.weight": o.reshape(-1, e).T,
        "mlp.gate_proj.weight": fc1[:, 0, :].T,
        "mlp.up_proj.weight": fc1[:, 1, :].T,
        "mlp.down_proj.weight": fc2.T,
    }


def export_merged(model: Transformer, out_dir: str, source_dir: str) -> None:
    """Writes a full HF checkpoint with adapters merged, one tensor at a time, in the source dtype.

    config.json and tokenizer files are copied from `source_dir`. The decoder's tensors keep the
    source's names (a multimodal Gemma 3's under model.language_model); every other tensor of the
    source (its vision tower and projector) is copied unchanged. Call on process 0.
    """
    src = HFCheckpoint(source_dir)
    cfg, dtype = src.config, src.source_dtype()
    os.makedirs(out_dir, exist_ok=True)
    shapes = hf_tensor_shapes(cfg)
    norms = {name: ours for ours, name in hf_norm_names(cfg).items()}
    g = cfg.q_per_kv
    cache: dict[int, dict[str, np.ndarray]] = {}

    def produce(name: str) -> np.ndarray:
        get = lambda v: np.asarray(jax.device_get(v), np.float32)  # noqa: E731
        if name == "model.embed_tokens.weight":
            return get(model.embed.get_value())
        if name == "lm_head.weight":
            return get(model.lm_head.get_value())
        if name == "model.norm.weight":
            return get(model.final_norm.get_value())
        i = int(name.split(".")[2])
        suffix = name[len(_LAYER.format(i)) :]
        if suffix in norms:
            return get(getattr(model.layers, norms[suffix])[i])
        if suffix.endswith(".bias"):
            bias = get(model.layers.qkv.bias[i])
            part = {"q_proj": bias[:, :g], "k_proj": bias[:, g], "v_proj": bias[:, g + 1]}[suffix.split(".")[1]]
            return part.reshape(-1)
        if i not in cache:
            cache.clear()  # one layer's kernels at a time
            cache[i] = hf_tensors_of_layer(cfg, merged_layer_kernels(model, i))
        return cache[i][suffix]

    real = {src.real_name.get(n, n): n for n in shapes}  # the name in the source file -> ours
    specs = [(r, shapes[n], dtype) for r, n in real.items()]
    passed = {r: n for n, r in src.real_name.items() if n not in shapes and not _tied_head(cfg, n)}
    specs += [(r, src.shape(n), src.location[n].dtype(r)) for r, n in passed.items()]

    def tensor(name: str) -> np.ndarray:
        return produce(real[name]) if name in real else src.read(passed[name])

    write_safetensors(os.path.join(out_dir, "model.safetensors"), specs, tensor)
    for fname in os.listdir(source_dir):
        if fname.endswith((".json", ".model", ".txt", ".jinja")) and fname != "model.safetensors.index.json":
            shutil.copy(os.path.join(source_dir, fname), os.path.join(out_dir, fname))


def _tied_head(cfg: ModelConfig, name: str) -> bool:
    """A tied LM head that a checkpoint stores anyway is the embedding: written as such, not copied."""
    return cfg.tie_word_embeddings and name == "lm_head.weight"


def load_hf_model_config(path: str) -> ModelConfig:
    """Reads `<hf_dir>/config.json` (or a path to the file itself)."""
    from etils import epath

    p = epath.Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise MissingFileError(f"{p}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: invalid JSON ({e})") from None
    if cfg.get("model_type") == "llava":  # the language model of a LLaVA checkpoint (lora_jax/model/llava.py)
        if not isinstance(cfg.get("text_config"), dict):
            raise CheckpointError(f"{p}: a llava config needs a text_config object")
        text = model_config_from_hf(cfg["text_config"], source=f"{p} text_config")
        return dataclasses.replace(text, hf_prefix="model.language_model.")  # PEFT's module names on the decoder
    return model_config_from_hf(cfg, source=str(p))
