"""Launchers: a sweep's runs on this machine, on XManager, or on GCP TPU VMs. They build commands
for main.py and never import lora_jax."""
