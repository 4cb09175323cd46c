"""Checkpoint import: sharded index, bf16, and one clear error per kind of bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.io.hf_checkpoint import HFCheckpoint, load_hf_model
from lora_jax.model.transformer import RuntimeOptions
from lora_jax.sharding import make_mesh
from tests.hf_reference import hf_logits, make_hf_model, saved_hf_dir

TOKENS = np.random.default_rng(0).integers(0, 97, size=(1, 12))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((1, 4, 2))


def test_sharded_index_checkpoint_in_bf16_source(tmp_path, mesh):
    import torch

    model = make_hf_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_hf_model(str(tmp_path), None, RuntimeOptions(), mesh)
    assert ours.layers.qkv.kernel.get_value().sharding.spec[1] == "fsdp"  # created sharded
    ref = hf_logits(str(tmp_path), TOKENS)  # transformers upcasts the same bf16 weights to f32
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, t: m(t))(ours, jnp.asarray(TOKENS))), ref, atol=1e-4)
    assert HFCheckpoint(str(tmp_path)).source_dtype() == jnp.bfloat16


def _copy(tmp_path, variant="llama"):
    d = tmp_path / "ckpt"
    shutil.copytree(saved_hf_dir(variant), d)
    return d


def test_missing_dir_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFCheckpoint(str(tmp_path / "nope"))
    d = _copy(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        HFCheckpoint(str(d))


def test_bin_weights_are_refused(tmp_path):
    d = _copy(tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors are required"):
        HFCheckpoint(str(d))


def test_config_weight_shape_mismatch(tmp_path):
    d = _copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match="gate_proj.weight has shape \\(48, 32\\), but config.json implies \\(64, 32\\)"
    ):
        HFCheckpoint(str(d))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "gemma"}, "model_type 'gemma' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope type 'yarn'"),
    ],
)
def test_unsupported_config(tmp_path, change, message):
    d = _copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        HFCheckpoint(str(d))


def test_missing_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(tmp_path, "mistral")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
        HFCheckpoint(str(d))
