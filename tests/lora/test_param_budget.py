"""lora.param_budget: every study arm trains about the same number of parameters."""

import pytest

from configs.base import arm_config
from lora_jax.errors import ConfigError
from lora_jax.lora.arms import ARMS
from lora_jax.lora.spec import LoraSpec
from lora_jax.run.config import lora_spec, model_config_of
from lora_jax.train.accounting import lora_params_per_target

# Qwen2.5-7B's shape
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28)
QWEN25_7B.update(num_heads=28, num_kv_heads=4, head_dim=128)


@pytest.mark.parametrize("arm", list(ARMS))
def test_every_arm_is_within_one_rank_step_of_the_budget(arm):
    config = arm_config("cocohd", arm)
    for k, v in QWEN25_7B.items():
        config.model[k] = v
    budget = 40_000_000
    config.lora.param_budget = budget
    spec = lora_spec(config)
    cfg = model_config_of(config)
    trained = sum(lora_params_per_target(cfg, spec).values())
    step = sum(lora_params_per_target(cfg, LoraSpec(targets=spec.targets, rank=1, alpha=1.0)).values())
    assert abs(trained - budget) <= step / 2, (arm, spec.rank, trained)
    assert spec.rank >= 1


def test_budget_rank_differs_by_arm_and_refuses_overrides():
    def rank(arm, **extra):
        config = arm_config("cocohd", arm)
        for k, v in QWEN25_7B.items():
            config.model[k] = v
        config.lora.param_budget = 40_000_000
        for k, v in extra.items():
            config.lora.rank_overrides[k] = v
        return lora_spec(config).rank

    assert rank("oproj") > rank("oproj_fc2") > rank("all")  # wider targets, smaller rank
    with pytest.raises(ConfigError, match="cannot be combined with lora.rank_overrides"):
        rank("oproj", o_proj=4)
