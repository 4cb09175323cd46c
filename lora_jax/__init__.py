"""lora_jax: LoRA target-module ablations for Llama-family models in JAX/Flax NNX.

The library, in wings; imports only point down (tests/test_import_graph.py checks it):

    run/    config validation, assembly of a run, the training loop, mode=eval — the only wing that
            imports data/ and eval/
    train/  the jitted step, the loss, accounting (params, FLOPs, MFU), the trainer, divergence
    serve/  generation, latency, serving several adapters over one base
    io/     checkpoints in (HF, LLaVA), PEFT in/out, safetensors, orbax checkpoints, atomic writes
    model/  the transformer, attention, rope, the model config, the vision tower, LLaVA, arm views (no I/O)
    lora/   targets and arms (jax-free), LoraSpec, the LoRA math, the adapter bank
    sharding.py  errors.py  multihost.py

This file and lora/__init__.py import nothing, so configs/ can read lora/arms.py without jax.
"""
