"""The models, pure (no file I/O): the Llama-family transformer (transformer.py) with its attention,
rope and config, the LLaVA vision tower and projector (vision.py, llava.py), an adapter bank seen
arm by arm (arm_views.py), and the host-side random init of a fresh model (init.py)."""
