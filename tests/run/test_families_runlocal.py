"""`:runlocal` on a tiny random model of each family (model.family): all nine arms train jointly."""

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import base
from lora_jax.errors import ConfigError
from lora_jax.lora.arms import ARMS
from lora_jax.run.assemble import base_fingerprint
from lora_jax.run.config import random_model_config
from tests.cli import run_main_ok

HF_MODULES = {"qkv": "q_proj", "o_proj": "o_proj", "fc1": "gate_proj", "fc2": "down_proj"}


def _config(family):
    config = base.arm_config("cocohd", "oproj", "runlocal")
    config.model.family = family
    return config


def test_each_family_is_its_own_random_base():
    cfgs = {f: random_model_config(_config(f)) for f in ("llama", "qwen3", "gemma3")}
    assert (cfgs["llama"].qk_norm, cfgs["qwen3"].qk_norm, cfgs["gemma3"].qk_norm) == (False, True, True)
    g = cfgs["gemma3"]
    assert g.gemma_norms and g.embed_scale and g.tie_word_embeddings and g.sliding_windows == (64, None)
    prints = {f: base_fingerprint(_config(f)) for f in cfgs}
    assert len(set(prints.values())) == 3  # an adapter of one family's base is refused on another's
    with pytest.raises(ConfigError, match="model.family='gemma2' is unknown"):
        random_model_config(_config("gemma2"))


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_every_arm_trains_on_a_random_model_of_the_family(family, tmp_path):
    """Two steps on rows of 256 tokens: the gemma3 model's sliding layer (window 64) is really windowed."""
    run_main_ok(
        tmp_path,
        f"--config.model.family={family}",
        "--config.train.total_steps=2",
        "--config.train.checkpoint_every_steps=2",
        "--config.train.log_every_steps=2",
        "--config.data.max_seq_len=256",
        "--config.data.max_target_tokens=192",
        "--config.eval.max_eval_batches=1",
        "--config.eval.evaluators=('loss',)",
        config="configs/medmcqa_all_arms.py:runlocal",
    )
    expected = base_fingerprint(_config(family))
    for arm, targets in ARMS.items():
        d = tmp_path / f"medmcqa_{arm}_s0"
        summary = json.loads((d / "summary.json").read_text())
        assert summary["status"] == "done" and summary["final_step"] == 2 and math.isfinite(summary["eval_loss"])
        assert summary["base_model"] == expected
        tensors = load_file(str(d / "adapter" / "adapter_model.safetensors"))
        for target in targets:
            b = [v for k, v in tensors.items() if f".{HF_MODULES[target]}.lora_B" in k]
            assert b and all(np.abs(x).max() > 0 for x in b), (arm, target)  # B starts at 0: trained
