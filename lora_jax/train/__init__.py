"""Training: the chunked loss (loss.py), the jitted train/eval steps (step.py), the trainer that owns
the state and exports the adapter (trainer.py), parameter/FLOP accounting (accounting.py) and the
divergence rules (divergence.py)."""
