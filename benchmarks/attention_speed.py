"""Attention forward + backward time per layer at long context (prints one line per impl and length).

    python benchmarks/attention_speed.py [--lengths 8192,32768] [--impls chunked,causal_blocks,xla]

Shapes: batch 1, 8 query heads over 4 kv heads, head_dim 64, float32, one packed row (one segment).
Time = median of --repeats calls of jit(value_and_grad(sum of attention output)) after a warm-up.
An implementation whose score matrices would not fit in --max_gib of memory is skipped, saying so.
FLOP/s uses the causal half: fwd 4·T²/2·H·D, bwd 2× fwd (the attention part of DESIGN's definition).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lora_jax.model.attention import get_attention_impl

KV_HEADS, Q_PER_KV, HEAD_DIM = 4, 2, 64
DENSE_IMPLS = ("xla", "causal_blocks")  # materialise [T, T] scores (causal_blocks: about half)


def fwd_bwd(impl: str, t: int):
    attn = get_attention_impl(impl)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, t, KV_HEADS, Q_PER_KV, HEAD_DIM)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, t, KV_HEADS, HEAD_DIM)), jnp.float32) for _ in range(2))
    pos, seg = jnp.arange(t)[None], jnp.ones((1, t), jnp.int32)

    def loss(q, k, v):
        return attn(q, k, v, pos, pos, seg, seg, window=None, scale=HEAD_DIM**-0.5).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return lambda: jax.block_until_ready(step(q, k, v))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--impls", default="chunked,causal_blocks,xla")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_gib", type=float, default=12.0)
    args = parser.parse_args()
    heads = KV_HEADS * Q_PER_KV
    print(f"{'impl':>14} {'tokens':>7} {'fwd+bwd s':>10} {'GFLOP/s':>8}")
    for t in (int(x) for x in args.lengths.split(",")):
        flops = 3 * 4 * (t * t / 2) * heads * HEAD_DIM
        for impl in args.impls.split(","):
            scores_gib = 3 * heads * t * t * 4 / 2**30  # scores, probabilities and their gradient
            if impl in DENSE_IMPLS and scores_gib > args.max_gib:
                print(f"{impl:>14} {t:>7} {'skipped':>10}  (dense scores need ~{scores_gib:.0f} GiB > --max_gib)")
                continue
            run = fwd_bwd(impl, t)
            run()  # compile
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            s = statistics.median(times)
            print(f"{impl:>14} {t:>7} {s:>10.3f} {flops / s / 1e9:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
