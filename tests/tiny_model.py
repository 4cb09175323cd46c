"""The tiny random model shared by the LoRA, program and accounting tests."""

from lora_jax.model_config import ModelConfig

TINY = ModelConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
