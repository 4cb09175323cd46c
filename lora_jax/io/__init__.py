"""Files in and out: Hugging Face checkpoints (hf_checkpoint.py, llava_checkpoint.py), PEFT adapters
(peft_adapter.py), safetensors (safetensors_file.py), orbax run checkpoints (checkpoints.py) and the
one atomic text write (files.py). Never write `from lora_jax import io`: import the modules by path."""
