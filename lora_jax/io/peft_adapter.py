"""Adapters to and from the Hugging Face PEFT format (adapter_config.json + adapter_model.safetensors).

Export is exact for the fused targets: `qkv` writes one shared A for q/k/v and splits B per module;
`fc1` likewise for gate/up. Per-target rank/alpha overrides and rsLoRA become `rank_pattern`,
`alpha_pattern` and `use_rslora` so PEFT and vLLM scale every module right.

Import of a PEFT adapter with separate q/k/v (or gate/up) adapters is exact too: their ranks are
stacked (A side by side, B block-diagonal), and a module whose scale differs from its target's
has the ratio folded into its B.
"""

from __future__ import annotations

import json
import math
import re

import jax
import numpy as np
from etils import epath

from lora_jax.errors import CheckpointError, MissingFileError
from lora_jax.io.files import write_text_atomic
from lora_jax.io.hf_checkpoint import HFCheckpoint, load_hf_model
from lora_jax.io.llava_checkpoint import load_llava
from lora_jax.io.safetensors_file import SafetensorsFile, write_safetensors
from lora_jax.lora.arms import TARGETS
from lora_jax.lora.spec import LoraSpec
from lora_jax.model.config import ModelConfig
from lora_jax.model.transformer import Transformer, target_shapes

# study target -> the Hugging Face modules it covers, with their parent block.
HF_MODULES = {
    "qkv": (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj")),
    "o_proj": (("self_attn", "o_proj"),),
    "fc1": (("mlp", "gate_proj"), ("mlp", "up_proj")),
    "fc2": (("mlp", "down_proj"),),
}
MODULE_TO_TARGET = {m: t for t, mods in HF_MODULES.items() for _, m in mods}
MODULE_BLOCK = {m: block for mods in HF_MODULES.values() for block, m in mods}
_KEY = "base_model.model.model.layers.{layer}.{block}.{module}.lora_{ab}.weight"
# On transformers' LlavaForConditionalGeneration the decoder is model.language_model (older
# transformers: language_model.model); PEFT's keys follow the module paths.
_LLAVA_KEY = "base_model.model.model.language_model.layers.{layer}.{block}.{module}.lora_{ab}.weight"
_KEY_RE = re.compile(
    r"base_model\.model\.(?:model\.language_model\.|language_model\.model\.|model\.)layers\.(\d+)\.(\w+)\.(\w+)"
    r"\.lora_([AB])(?:\.[^.]+)?\.weight$"
)


def _hf_factors(cfg: ModelConfig, target: str, a: np.ndarray, b: np.ndarray) -> dict[str, tuple]:
    """One layer's (a [*in, r], b [r, *out]) -> {hf_module: (lora_A [r, in], lora_B [out, r])}."""
    r, g = a.shape[-1], cfg.q_per_kv
    a_t = a.reshape(-1, r).T
    if target == "qkv":
        return {
            "q_proj": (a_t, b[:, :, :g, :].reshape(r, -1).T),
            "k_proj": (a_t, b[:, :, g, :].reshape(r, -1).T),
            "v_proj": (a_t, b[:, :, g + 1, :].reshape(r, -1).T),
        }
    if target == "fc1":
        return {"gate_proj": (a_t, b[:, 0, :].T), "up_proj": (a_t, b[:, 1, :].T)}
    return {HF_MODULES[target][0][1]: (a_t, b.reshape(r, -1).T)}


BASE_FILE = "lora_jax_base.json"  # beside a PEFT adapter we wrote: {"base_model": the base's fingerprint}


def check_adapter_base(adapter_dir: str, base_fingerprint: str) -> None:
    """Refuses (CheckpointError naming the file and both fingerprints) an adapter whose `lora_jax_base.json`
    records another base than `base_fingerprint`. An adapter without the file (trained with PEFT
    elsewhere) says nothing about its base and passes."""
    path = epath.Path(adapter_dir) / BASE_FILE
    if not path.exists():
        return
    try:
        recorded = json.loads(path.read_text())["base_model"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f'{path}: unreadable (expected {{"base_model": "<fingerprint>"}})') from None
    if recorded != base_fingerprint:
        raise CheckpointError(
            f"{path}: the adapter was trained on base {recorded}, but this run's base is {base_fingerprint} "
            "(model.hf_dir and the model settings must be those the adapter was trained with)"
        )


def export_peft(model: Transformer, out_dir: str, base_model_name_or_path: str = "") -> None:
    """Writes the model's adapters in PEFT format (each file atomically). Call on process 0.

    A Llava's adapters (on its language model), and a multimodal Gemma 3's, are named as PEFT names
    them on transformers' LlavaForConditionalGeneration / Gemma3ForConditionalGeneration, and
    target_modules is a regex over the language model's modules only (the vision tower also has
    q/k/v_proj), with the layers in it (PEFT refuses layers_to_transform beside a regex)."""
    llava = hasattr(model, "llava_config")
    model = model.language if llava else model
    spec, cfg = model.lora, model.config
    # A multimodal Gemma 3's decoder sits under model.language_model as a LLaVA's does, beside a
    # vision tower with its own q/k/v_proj and fc1/fc2: the same keys and the same scoped regex.
    wrapped = llava or cfg.hf_prefix == "model.language_model."
    if spec is None or not spec.targets:
        raise ValueError("the model has no LoRA adapters to export")
    if model.merged:
        raise ValueError("adapters are merged into the kernels; unmerge before exporting them")
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for target in spec.targets:
        proj = getattr(model.layers, target)
        a_all = np.asarray(jax.device_get(proj.lora_a.get_value()), np.float32)
        b_all = np.asarray(jax.device_get(proj.lora_b.get_value()), np.float32)
        for layer in spec.layers or range(cfg.num_layers):
            for module, (la, lb) in _hf_factors(cfg, target, a_all[layer], b_all[layer]).items():
                block = MODULE_BLOCK[module]
                key = _LLAVA_KEY if wrapped else _KEY
                tensors[key.format(layer=layer, block=block, module=module, ab="A")] = la
                tensors[key.format(layer=layer, block=block, module=module, ab="B")] = lb
    specs = [(k, v.shape, np.float32) for k, v in sorted(tensors.items())]
    write_safetensors(str(out / "adapter_model.safetensors"), specs, tensors.__getitem__)
    modules = [m for t in spec.targets for _, m in HF_MODULES[t]]
    rank_pattern = {
        m: spec.rank_for(t) for t in spec.targets for _, m in HF_MODULES[t] if spec.rank_for(t) != spec.rank
    }
    alpha_pattern = {
        m: spec.alpha_for(t) for t in spec.targets for _, m in HF_MODULES[t] if spec.alpha_for(t) != spec.alpha
    }
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.use_rslora,
        "target_modules": _llava_modules(modules, spec.layers) if wrapped else modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None if wrapped else (list(spec.layers) or None),
        "init_lora_weights": True,
        "inference_mode": True,
    }
    write_text_atomic(out / "adapter_config.json", json.dumps(config, indent=2))


def _llava_modules(modules: list[str], layers: tuple[int, ...]) -> str:
    """PEFT's regex (full match) for these modules of the LLaVA language model's layers."""
    which = "|".join(str(i) for i in layers) if layers else r"\d+"
    return rf"model\.language_model\.layers\.({which})\.(self_attn|mlp)\.({'|'.join(modules)})"


def _check_supported(config: dict, path: str) -> None:
    def refuse(what):
        raise CheckpointError(f"{path}: {what} is not supported")

    if config.get("peft_type", "LORA") != "LORA":
        refuse(f"peft_type {config.get('peft_type')!r} (only LORA)")
    if config.get("use_dora"):
        refuse("use_dora=true (DoRA)")
    if config.get("bias", "none") != "none":
        refuse(f"bias={config.get('bias')!r} (only 'none')")
    if config.get("lora_bias"):
        refuse("lora_bias=true")
    if config.get("modules_to_save"):
        refuse(f"modules_to_save={config.get('modules_to_save')}")
    if config.get("layers_pattern") not in (None, "layers", ["layers"]):
        refuse(f"layers_pattern={config.get('layers_pattern')!r} (decoder layers are 'layers')")
    if config.get("fan_in_fan_out"):
        refuse("fan_in_fan_out=true")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    for bad in ("embed_tokens", "lm_head"):
        if any(bad in t for t in targets):
            refuse(f"a LoRA adapter on {bad} (embedding/LM-head targets)")


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rule: a pattern key matches a module whose full name ends with it (or as a regex)."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module_path):
            return value
    return default


def read_peft_adapter(adapter_dir: str, cfg: ModelConfig, base_spec: LoraSpec | None = None):
    """Reads a PEFT adapter -> (LoraSpec, {target: (a [L, *in, r], b [L, r, *out])}) for our layout."""
    d = epath.Path(adapter_dir)
    cfg_path, weights_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    for p in (cfg_path, weights_path):
        if not p.exists():
            raise MissingFileError(
                f"{p}: missing (a PEFT adapter needs adapter_config.json and adapter_model.safetensors)"
            )
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    _check_supported(config, str(cfg_path))
    f = SafetensorsFile(str(weights_path))
    factors: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for key in f.keys():
        m = _KEY_RE.match(key)
        if not m:
            raise CheckpointError(f"{weights_path}: tensor {key} is not a LoRA A/B weight of a decoder layer")
        layer, module, ab = int(m.group(1)), m.group(3), m.group(4)
        if module not in MODULE_TO_TARGET:
            raise CheckpointError(f"{weights_path}: adapter on module {module!r} is not supported")
        if layer >= cfg.num_layers:
            raise CheckpointError(f"{weights_path}: layer {layer} but the model has {cfg.num_layers} layers")
        factors.setdefault((module, layer), {})[ab] = np.asarray(f.read(key), np.float32)
    modules = sorted({m for m, _ in factors})
    layers = _layers_to_transform(config, cfg, str(cfg_path))
    if not layers and isinstance(config.get("target_modules"), str):  # a regex: the layers that have tensors
        present = sorted({i for _, i in factors})
        layers = present if len(present) < cfg.num_layers else []
    for module in modules:
        missing = [i for i in layers or range(cfg.num_layers) if (module, i) not in factors]
        if missing:
            raise CheckpointError(f"{weights_path}: module {module} has no adapter on layers {missing}")
        if layers:  # the layers PEFT leaves alone: zero factors, masked out by spec.layers anyway
            some = factors[(module, layers[0])]
            for i in set(range(cfg.num_layers)) - set(layers):
                factors[(module, i)] = {k: np.zeros_like(v) for k, v in some.items()}
    r0, alpha0, rslora = int(config.get("r", 8)), float(config.get("lora_alpha", 8)), bool(config.get("use_rslora"))
    alpha_pat = config.get("alpha_pattern") or {}

    def module_scale(module, layer, rank):
        path = f"{cfg.hf_prefix}layers.{layer}.{MODULE_BLOCK[module]}.{module}"  # PEFT's module name
        alpha = float(_pattern_value(alpha_pat, path, alpha0))  # ranks come from the tensor shapes
        return alpha / (math.sqrt(rank) if rslora else rank)

    targets = [t for t in TARGETS if any(MODULE_TO_TARGET[m] == t for m in modules)]
    weights, ranks, scales = {}, {}, {}
    for target in targets:
        present = [m for _, m in HF_MODULES[target] if m in modules]
        ref_scale = module_scale(present[0], 0, factors[(present[0], 0)]["A"].shape[0])
        # Our own fused export writes one A shared by q/k/v (gate/up): keep it shared, not stacked.
        shared = all(
            np.array_equal(factors[(m, i)]["A"], factors[(present[0], i)]["A"])
            and math.isclose(module_scale(m, i, factors[(m, i)]["A"].shape[0]), ref_scale)
            for m in present
            for i in range(cfg.num_layers)
        )
        # rank of the stacked adapter: the widest layer's sum of module ranks.
        per_layer = [
            sum(factors[(m, i)]["A"].shape[0] for m in (present[:1] if shared else present))
            for i in range(cfg.num_layers)
        ]
        rank = max(per_layer)
        a_layers, b_layers = [], []
        for i in range(cfg.num_layers):
            layer_factors = {m: factors[(m, i)] for m in present}
            a_i, b_i = _stack_layer(cfg, target, present, layer_factors, rank, shared)
            for m, (lo, hi) in _rank_ranges(present, layer_factors, shared):
                if shared:
                    break
                ratio = module_scale(m, i, hi - lo) / ref_scale
                b_i[lo:hi] *= ratio
            a_layers.append(a_i)
            b_layers.append(b_i)
        weights[target] = (np.stack(a_layers), np.stack(b_layers))
        ranks[target], scales[target] = rank, ref_scale
    base = base_spec or LoraSpec(targets=tuple(targets), rank=r0, alpha=alpha0, use_rslora=rslora)
    alphas = {t: scales[t] * (math.sqrt(ranks[t]) if rslora else ranks[t]) for t in targets}
    spec = LoraSpec(
        targets=tuple(targets),
        rank=base.rank,
        alpha=base.alpha,
        dropout=float(config.get("lora_dropout", 0.0)) if base_spec is None else base.dropout,
        use_rslora=rslora,
        rank_overrides={t: ranks[t] for t in targets if ranks[t] != base.rank},
        alpha_overrides={t: alphas[t] for t in targets if not math.isclose(alphas[t], base.alpha)},
        layers=tuple(layers),
    )
    return spec, weights


def _layers_to_transform(config: dict, cfg: ModelConfig, path: str) -> list[int]:
    """PEFT's layers_to_transform (an int or a list) as sorted indices; [] = every layer."""
    value = config.get("layers_to_transform")
    if value is None:
        return []
    layers = sorted({int(v) for v in ([value] if isinstance(value, int) else value)})
    if not layers or layers[0] < 0 or layers[-1] >= cfg.num_layers:
        raise CheckpointError(f"{path}: layers_to_transform={value} is not within the model's {cfg.num_layers} layers")
    return layers


def _rank_ranges(present, layer_factors, shared=False):
    """(module, rank rows) of each module in the stacked adapter; all rows 0..r when A is shared."""
    lo = 0
    for m in present:
        r = layer_factors[m]["A"].shape[0]
        yield m, (lo, lo + r)
        lo += 0 if shared else r


def _stack_layer(cfg: ModelConfig, target: str, present, layer_factors, rank, shared=False):
    """Stacks one layer's per-module (A [r, in], B [out, r]) into our (a [*in, rank], b [rank, *out])."""
    in_dims, out_dims, _, _ = target_shapes(cfg)[target]
    a = np.zeros((*in_dims, rank), np.float32)
    b = np.zeros((rank, *out_dims), np.float32)
    g = cfg.q_per_kv
    for m, (lo, hi) in _rank_ranges(present, layer_factors, shared):
        fa, fb = layer_factors[m]["A"], layer_factors[m]["B"]  # [r, in], [out, r]
        a[..., lo:hi] = fa.T.reshape(*in_dims, hi - lo)
        r = hi - lo
        if target == "qkv":
            k, d = cfg.num_kv_heads, cfg.head_dim
            if m == "q_proj":
                b[lo:hi, :, :g, :] = fb.T.reshape(r, k, g, d)
            else:
                b[lo:hi, :, g if m == "k_proj" else g + 1, :] = fb.T.reshape(r, k, d)
        elif target == "fc1":
            b[lo:hi, 0 if m == "gate_proj" else 1, :] = fb.T
        else:
            b[lo:hi] = fb.T.reshape(r, *out_dims)
    return a, b


def set_lora_weights(model: Transformer, weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Copies adapter arrays into a model built with the matching spec, keeping each variable's sharding."""
    for target, (a, b) in weights.items():
        proj = getattr(model.layers, target)
        if proj.lora_a is None:
            raise ValueError(f"the model has no LoRA adapter on {target}")
        for var, value in ((proj.lora_a, a), (proj.lora_b, b)):
            old = var.get_value()
            if old.shape != value.shape:
                raise ValueError(f"adapter {target}: shape {value.shape} does not fit the model's {old.shape}")
            var.set_value(jax.device_put(value.astype(old.dtype), old.sharding))


def adapter_fits(spec: LoraSpec, slots: LoraSpec | None) -> bool:
    """Whether an adapter of `spec` can be written into a model's adapter slots `slots` as they are:
    the same targets, rsLoRA, layers, and per-target ranks and scales."""
    if slots is None or (spec.targets, spec.use_rslora, spec.layers) != (slots.targets, slots.use_rslora, slots.layers):
        return False
    return all(
        spec.rank_for(t) == slots.rank_for(t) and math.isclose(spec.alpha_for(t), slots.alpha_for(t))
        for t in spec.targets
    )


def with_adapter(model: Transformer, adapter_dir: str, hf_dir: str | None = None, options=None, mesh=None):
    """`model`'s base with the PEFT adapter in adapter_dir: its weights set in place when the adapter
    fits the model's adapter slots (same targets, ranks and scales), else (given the base's hf_dir) the base
    loaded again with adapters shaped like the file's. One call: base + adapter, scored as PEFT would."""
    spec, weights = read_peft_adapter(adapter_dir, model.config, model.lora)
    if not adapter_fits(spec, model.lora):
        if hf_dir is None:
            have = "no adapters" if model.lora is None else f"targets {model.lora.targets}"
            raise CheckpointError(
                f"{adapter_dir}: adapter on {spec.targets} does not fit the model ({have}); a randomly "
                "initialised base can only take an adapter of the config's own arm"
            )
        if hasattr(model, "llava_config"):
            model = load_llava(hf_dir, spec, options, mesh)
        else:
            model = load_hf_model(hf_dir, spec, options, mesh)
    set_lora_weights(getattr(model, "language", model), weights)  # a Llava's adapters are on its decoder
    return model


def load_hf_model_with_adapter(hf_dir: str, adapter_dir: str, options, mesh) -> Transformer:
    """A Hugging Face checkpoint with a PEFT adapter on it, in one call."""
    spec, weights = read_peft_adapter(adapter_dir, HFCheckpoint(hf_dir).config)
    model = load_hf_model(hf_dir, spec, options, mesh)
    set_lora_weights(model, weights)
    return model
