"""lora_jax: LoRA target-module ablations for Llama-family models in JAX/Flax NNX."""
