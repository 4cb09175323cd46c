"""Tiny random transformers checkpoints for parity tests (torch imported lazily: it is slow to load)."""

from __future__ import annotations

import functools
import os
import tempfile

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)

VARIANTS = {
    "llama": dict(
        model_type="llama",
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "qwen2": dict(
        model_type="qwen2", tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6)
    ),
    "mistral": dict(
        model_type="mistral", sliding_window=None, rope_parameters=dict(rope_type="default", rope_theta=1e4)
    ),
    "mistral_sw8": dict(
        model_type="mistral", sliding_window=8, rope_parameters=dict(rope_type="default", rope_theta=1e4)
    ),
    "qwen2_sw8": dict(
        model_type="qwen2",
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
    ),
    # head_dim 16 with hidden 32 / 4 heads: Qwen3's head_dim is its own setting.
    "qwen3": dict(model_type="qwen3", head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    # One sliding layer (window 8) and one global, each with its own RoPE (the global one linearly
    # scaled), a query scale that is not head_dim's, and a soft cap small enough to bite.
    "gemma3": dict(
        model_type="gemma3_text",
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
            "sliding_attention": dict(rope_type="default", rope_theta=1e4),
        },
        final_logit_softcapping=1.5,
    ),
}
GEMMA3_VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)


def gemma3_multimodal_config():
    """A gemma3 (image-text) config whose language model is the "gemma3" variant above."""
    import transformers

    text = dict(TINY, **VARIANTS["gemma3"])
    text.pop("model_type")
    return transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(**text),
        vision_config=transformers.SiglipVisionConfig(**{k: v for k, v in GEMMA3_VISION.items() if k != "model_type"}),
        mm_tokens_per_image=4,
        image_token_id=96,
        boi_token_id=94,
        eoi_token_id=95,
    )


def make_hf_model(variant: str, seed: int = 0):
    """A transformers model with random weights, norms and biases perturbed away from their init."""
    import torch
    import transformers

    if variant == "gemma3_mm":
        config = gemma3_multimodal_config()
        model_class = transformers.AutoModelForImageTextToText
    else:
        kwargs = dict(TINY, **VARIANTS[variant])
        model_type = kwargs.pop("model_type")
        config = transformers.AutoConfig.for_model(model_type, **kwargs)
        model_class = transformers.AutoModelForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model


@functools.lru_cache(maxsize=None)
def saved_hf_dir(variant: str) -> str:
    """The variant saved as safetensors in a temp dir (cached for the test session)."""
    d = tempfile.mkdtemp(prefix=f"hf_{variant}_")
    make_hf_model(variant).save_pretrained(d, safe_serialization=True)
    return d


def _auto_class(hf_dir: str):
    """transformers' class for the checkpoint: the image-text class for a multimodal gemma3."""
    import json

    import transformers

    with open(os.path.join(hf_dir, "config.json")) as f:
        multimodal = json.load(f)["model_type"] == "gemma3"
    return transformers.AutoModelForImageTextToText if multimodal else transformers.AutoModelForCausalLM


def hf_logits(hf_dir: str, tokens, attention_mask=None, adapter_dir: str | None = None):
    import numpy as np
    import torch

    model = _auto_class(hf_dir).from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    if adapter_dir is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        am = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
        return model(input_ids=t, attention_mask=am).logits.float().numpy()


def list_dir(d: str) -> list[str]:
    return sorted(os.listdir(d))


def peft_fc2_adapter(d, rank=4):
    """A PEFT adapter on down_proj only (the fc2 arm), as PEFT writes one for the 2-layer model above."""
    import json

    import numpy as np

    from lora_jax.io.safetensors_file import write_safetensors

    d.mkdir()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["down_proj"], "bias": "none"}
    (d / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(1)
    key = "base_model.model.model.layers.{}.mlp.down_proj.lora_{}.weight"
    arrays = {key.format(n, "A"): rng.normal(size=(rank, 128)).astype(np.float32) for n in range(2)}
    arrays.update({key.format(n, "B"): rng.normal(size=(64, rank)).astype(np.float32) for n in range(2)})
    write_safetensors(
        str(d / "adapter_model.safetensors"), [(k, a.shape, np.float32) for k, a in arrays.items()], arrays.get
    )
    return d


def write_llama_dir(d, *, vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, seed=None, truncate=False):
    """A Llama checkpoint written without transformers (fast): config.json, model.safetensors (zeros, or
    N(0, 0.05) weights when `seed` is given; cut in half with `truncate`) and the tiny tokenizer."""
    import json

    import numpy as np

    from data import samples
    from lora_jax.io.safetensors_file import write_safetensors

    d.mkdir()
    cfg = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
        shapes.update({p + f"self_attn.{m}_proj.weight": (o, hidden) for m, o in (("q", q), ("k", kv), ("v", kv))})
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q)
        shapes.update(
            {p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden)}
        )
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
    rng = np.random.default_rng(seed)
    values = (lambda n: np.zeros(shapes[n])) if seed is None else (lambda n: rng.normal(size=shapes[n]) * 0.05)
    arrays = {n: values(n).astype(np.float32) for n in shapes}
    path = d / "model.safetensors"
    write_safetensors(str(path), [(n, s, np.float32) for n, s in shapes.items()], arrays.get)
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    samples.write_tiny_tokenizer(d)
    return d


def with_random_b(model, seed=0, scale=0.1):
    """The model with every adapter's B drawn N(0, scale²) (B starts at 0: the adapters then matter)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    for t in model.lora.targets:
        var = getattr(model.layers, t).lora_b
        value = rng.normal(size=var.get_value().shape) * scale
        var.set_value(jax.device_put(jnp.asarray(value, jnp.float32), var.get_value().sharding))
    return model
