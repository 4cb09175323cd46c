"""A run, end to end: config checks (config.py), building its parts (assemble.py), the callables
eval/ receives (eval_hooks.py), the training loop of one arm or of every arm of a dataset in one job
(train_loop.py), mode=eval (eval_mode.py) and the end-of-run summary (summary.py).

The only part of lora_jax that imports data/ and eval/."""
