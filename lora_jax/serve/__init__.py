"""Serving a trained model: batched generation with the KV cache (generate.py), decode latency the
serving way (latency.py), and several PEFT adapters over one base in one batch (bank.py)."""
