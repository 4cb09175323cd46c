"""The models, pure (no file I/O): the Llama-family transformer (transformer.py) with its attention,
rope and config, the LLaVA vision tower and projector (vision.py, llava.py), and an adapter bank seen
arm by arm (arm_views.py)."""
