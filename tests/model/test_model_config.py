import json

import pytest

from lora_jax.io.hf_checkpoint import load_hf_model_config
from lora_jax.model.config import model_config_from_hf
from tests.hf_reference import TINY

# The tiny parity config without head_dim, so the hidden_size // heads default is exercised too.
BASE = {k: v for k, v in TINY.items() if k not in ("head_dim", "rms_norm_eps")}
LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)


@pytest.mark.parametrize("type_key", ["type", "rope_type"])
def test_legacy_and_transformers5_rope_forms_agree(type_key):
    legacy = dict(BASE, model_type="llama", rope_theta=500000.0, rope_scaling={type_key: "llama3", **LLAMA3})
    new = dict(BASE, model_type="llama", rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3})
    a, b = model_config_from_hf(legacy), model_config_from_hf(new)
    assert a == b
    assert a.rope.rope_type == "llama3" and a.rope.theta == 500000.0 and a.head_dim == 8


def test_unsupported_rope_and_model_type_are_refused():
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        model_config_from_hf(dict(BASE, model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        model_config_from_hf(dict(BASE, model_type="gpt2"))
    with pytest.raises(ValueError, match="missing keys hidden_size"):
        model_config_from_hf({k: v for k, v in dict(BASE, model_type="llama").items() if k != "hidden_size"})


def test_sliding_window_forms():
    mistral = model_config_from_hf(dict(BASE, model_type="mistral", sliding_window=8))
    assert mistral.sliding_windows == (8, 8)
    assert model_config_from_hf(dict(BASE, model_type="mistral", sliding_window=None)).sliding_windows == ()
    qwen = dict(BASE, model_type="qwen2", sliding_window=8, max_window_layers=1)
    assert model_config_from_hf(qwen).sliding_windows == ()  # use_sliding_window off, as transformers
    assert model_config_from_hf(dict(qwen, use_sliding_window=True)).sliding_windows == (None, 8)
    typed = dict(qwen, use_sliding_window=True, layer_types=["sliding_attention", "full_attention"])
    assert model_config_from_hf(typed).sliding_windows == (8, None)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_model_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_hf_model_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(BASE, model_type="qwen2")))
    assert load_hf_model_config(str(tmp_path)).qkv_bias
