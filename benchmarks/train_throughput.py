"""LoRA train-step throughput and MFU on the bench model (prints one line per arm and dtype).

Bench model: Llama, vocab 32000, hidden 512, intermediate 1408, 8 layers, 8 heads / 4 kv heads
(head_dim 64), LoRA rank 16 alpha 32, batch 4 x 512.

    python benchmarks/train_throughput.py [--arms o_proj,o_proj+fc2,qkv,all] [--dtypes float32,bfloat16]

MFU = achieved FLOP/s (lora_jax.accounting's training-step definition) / the best of >= 5 timed
float32 2048^3 matmuls measured in this process, on one device. Median of --steps timed steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import base  # noqa: E402
from lora_jax import accounting, train  # noqa: E402
from lora_jax.model import Transformer  # noqa: E402
from lora_jax.sharding import make_mesh, shard_model  # noqa: E402

BENCH = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64
)


def bench_config(targets, dtype, attention_impl, remat, batch, seq_len):
    config = base.get_config()
    for k, v in BENCH.items():
        config.model[k] = v
    config.model.max_position_embeddings = seq_len
    config.model.param_dtype = config.model.compute_dtype = dtype
    config.model.attention_impl, config.model.remat = attention_impl, remat
    config.lora.targets, config.lora.rank, config.lora.alpha, config.lora.dropout = targets, 16, 32.0, 0.0
    config.train.global_batch_size, config.data.max_seq_len, config.train.total_steps = batch, seq_len, 1000
    config.train.loss_chunk_tokens = 512
    config.mesh.shape = (1, 1, 1)
    return config


def synthetic_batch(batch, seq_len, vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(batch, seq_len), dtype=np.int32)
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": np.ones((batch, seq_len), np.float32),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
    }


def measure(config, steps, mesh):
    model = Transformer(
        train.random_model_config(config), train.lora_spec(config), train.runtime_options(config), rngs=nnx.Rngs(0)
    )
    shard_model(model, mesh)
    t = train.build_trainer(model, config, mesh)
    b, s = config.train.global_batch_size, config.data.max_seq_len
    batch = train.global_batch(synthetic_batch(b, s, config.model.vocab_size), t.batch_sharding)
    lora, opt = t.lora, t.opt_state
    lora, opt, m = t.train_step(lora, opt, t.frozen, batch, 0)  # compile
    jax.block_until_ready(m)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        lora, opt, m = t.train_step(lora, opt, t.frozen, batch, i + 1)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = accounting.train_flops_per_step(model.config, model.lora, b, s)
    return step_s, b * s / step_s, flops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", default="o_proj,o_proj+fc2,qkv,all")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--attention", default="causal_blocks")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    print(f"device: {jax.devices()[0].device_kind}; peak = best of 5+5 float32 2048^3 matmuls around each row")
    print(f"{'arm':<14}{'dtype':<10}{'step s':>8}{'tokens/s':>10}{'TFLOP/step':>12}{'peak GF/s':>11}{'MFU':>7}")
    for arm in args.arms.split(","):
        targets = ("qkv", "o_proj", "fc1", "fc2") if arm == "all" else tuple(arm.split("+"))
        for dtype in args.dtypes.split(","):
            config = bench_config(targets, dtype, args.attention, args.remat, args.batch, args.seq_len)
            # The host's speed drifts (shared machine): the peak is the best of the measurements taken
            # right before and right after each timing.
            before = accounting.measure_matmul_peak()
            step_s, tok_s, flops = measure(config, args.steps, mesh)
            peak = max(before, accounting.measure_matmul_peak())
            mfu = flops / step_s / peak
            print(
                f"{arm:<14}{dtype:<10}{step_s:>8.3f}{tok_s:>10.0f}{flops / 1e12:>12.3f}{peak / 1e9:>11.1f}{mfu:>7.1%}"
            )


if __name__ == "__main__":
    main()
