"""LoRA: the study's targets and arms (arms.py, jax-free), LoraSpec (spec.py), the LoRA math and
adapter init (delta.py), and the adapter bank — K adapters over one frozen base (bank.py).

Imports nothing here: configs/ imports lora_jax.lora.arms and must stay free of jax."""
