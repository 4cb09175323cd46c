"""A compiled LoRA train step timed on one synthetic batch (train_throughput.py, many_adapters.py,
device_suite.py). It imports only numpy and lora_jax.sharding, so the device suite runs without the
run stack (ml-collections, clu, tfds)."""

from __future__ import annotations

import time

import numpy as np

from lora_jax.sharding import global_batch


def synthetic_batch(rows: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """Host arrays of one training batch: random tokens, each row one whole segment, every target in
    the loss."""
    tokens = np.random.default_rng(seed).integers(0, vocab, size=(rows, seq_len), dtype=np.int32)
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": np.ones((rows, seq_len), np.float32),
        "segment_ids": np.ones((rows, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
    }


class TimedStep:
    """A compiled train step (`train.step.CompiledSteps`, or a Trainer: the same fields) run on one
    fixed batch; the first step, which compiles, runs here (`compile_s`)."""

    def __init__(self, steps, host_batch: dict):
        self.c = steps
        self.batch = global_batch(host_batch, steps.batch_sharding)
        self.lora, self.opt, self.i = steps.lora, steps.opt_state, 0
        start = time.perf_counter()
        self.times(1)
        self.compile_s = time.perf_counter() - start

    def times(self, steps: int) -> list[float]:
        """Seconds of each of `steps` steps; a non-finite loss stops the benchmark."""
        out = []
        for _ in range(steps):
            start = time.perf_counter()
            self.lora, self.opt, m = self.c.train_step(self.lora, self.opt, self.c.frozen, self.batch, self.i)
            loss = float(np.asarray(m["loss"]).ravel()[0])  # blocks until the step is done
            out.append(time.perf_counter() - start)
            if not np.isfinite(loss):
                raise FloatingPointError(f"step {self.i}: loss {loss}")
            self.i += 1
        return out
