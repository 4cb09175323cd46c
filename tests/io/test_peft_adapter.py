"""Adapters against PEFT: our export loads in peft.PeftModel, PEFT-made adapters import exactly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.io.hf_checkpoint import export_merged, load_hf_model
from lora_jax.io.peft_adapter import export_peft, read_peft_adapter, set_lora_weights
from lora_jax.lora.arms import TARGETS
from lora_jax.lora.spec import LoraSpec
from lora_jax.model.transformer import RuntimeOptions
from lora_jax.sharding import make_mesh
from tests.hf_reference import hf_logits, saved_hf_dir, with_random_b

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 16))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((1, 2, 4))


@jax.jit
def _fwd(model, tokens):
    return model(tokens)


SPECS = {
    "uniform": LoraSpec(targets=TARGETS, rank=4, alpha=8),
    "overrides_rslora": LoraSpec(
        targets=("qkv", "o_proj", "fc2"),
        rank=4,
        alpha=8,
        use_rslora=True,
        rank_overrides={"fc2": 2, "qkv": 6},
        alpha_overrides={"o_proj": 3.0},
    ),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_export_loads_in_peft_with_matching_logits(name, mesh, tmp_path):
    d = saved_hf_dir("qwen2")
    model = with_random_b(load_hf_model(d, SPECS[name], RuntimeOptions(), mesh))
    ours = np.asarray(_fwd(model, jnp.asarray(TOKENS)))
    export_peft(model, str(tmp_path), d)
    ref = hf_logits(d, TOKENS, adapter_dir=str(tmp_path))
    assert np.abs(ours - hf_logits(d, TOKENS)).max() > 1e-2  # the adapter really changes the output
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    if name == "overrides_rslora":
        assert cfg["use_rslora"] and cfg["rank_pattern"] == {"q_proj": 6, "k_proj": 6, "v_proj": 6, "down_proj": 2}
        assert cfg["alpha_pattern"] == {"o_proj": 3.0}
    # and back in: the same spec (shared A kept shared), the same logits
    spec, weights = read_peft_adapter(str(tmp_path), model.config)
    assert spec == SPECS[name]
    again = load_hf_model(d, spec, RuntimeOptions(), mesh)
    set_lora_weights(again, weights)
    np.testing.assert_allclose(np.asarray(_fwd(again, jnp.asarray(TOKENS))), ours, atol=1e-6)


def test_peft_made_adapter_imports_exactly(mesh, tmp_path):
    import peft
    import torch
    import transformers

    d = saved_hf_dir("llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).float()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 5},
    )
    pm = peft.get_peft_model(hf, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(str(tmp_path))
    spec, weights = read_peft_adapter(str(tmp_path), load_hf_model(d, None, RuntimeOptions(), mesh).config)
    assert spec.targets == ("qkv", "fc2") and spec.rank_for("qkv") == 6  # q (4) and v (2) stacked
    model = load_hf_model(d, spec, RuntimeOptions(), mesh)
    set_lora_weights(model, weights)
    ref = hf_logits(d, TOKENS, adapter_dir=str(tmp_path))
    np.testing.assert_allclose(np.asarray(_fwd(model, jnp.asarray(TOKENS))), ref, atol=1e-4)


def test_merged_export_loads_in_transformers(mesh, tmp_path):
    d = saved_hf_dir("llama")
    model = with_random_b(load_hf_model(d, LoraSpec(targets=TARGETS, rank=4, alpha=8), RuntimeOptions(), mesh))
    export_merged(model, str(tmp_path), d)
    np.testing.assert_allclose(
        hf_logits(str(tmp_path), TOKENS), np.asarray(_fwd(model, jnp.asarray(TOKENS))), atol=1e-4
    )
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("use_dora", True, "DoRA"),
        ("bias", "all", "bias='all'"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("layers_pattern", "h", "layers_pattern='h'"),
        ("layers_to_transform", [7], r"layers_to_transform=\[7\] is not within the model's 2 layers"),
        ("target_modules", ["embed_tokens", "q_proj"], "embedding/LM-head"),
        ("peft_type", "IA3", "only LORA"),
    ],
)
def test_unsupported_peft_options_are_refused(field, value, message, mesh, tmp_path):
    d = saved_hf_dir("llama")
    model = load_hf_model(d, LoraSpec(targets=("o_proj",), rank=2, alpha=4), RuntimeOptions(), mesh)
    export_peft(model, str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        read_peft_adapter(str(tmp_path), model.config)


def test_missing_adapter_files(tmp_path):
    from lora_jax.model.config import model_config_from_hf

    cfg = model_config_from_hf(
        dict(
            model_type="llama",
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_peft_adapter(str(tmp_path), cfg)
