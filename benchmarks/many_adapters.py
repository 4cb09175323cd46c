"""Many adapters over one base: joint training step time, and decoding a batch that mixes adapters.

    python benchmarks/many_adapters.py [--arms qkv,oproj,…] [--dtype float32] [--steps 3] [--rounds 2]
        [--requests 20] [--skip train|decode]

Bench model: Llama, vocab 32000, hidden 512, intermediate 1408, 8 layers, 8 heads / 4 kv heads, LoRA
rank 16, batch 4 x 512 (training); decoding: a batch of K rows, prompt 128 tokens, 64 new tokens.

Training: the K arms jointly (one program, one copy of the base, AdapterBank) against one arm
alone ("all", the most expensive single arm) — median seconds per step, measured in interleaved
rounds (joint, one, joint, one, …) so host drift hits both; the ratio joint / one. Memory: the
base's bytes (held once) and the bank's adapter + AdamW bytes, against K separate jobs.

Decoding: TPOT/TTFT p50/p95 of a batch whose K rows use K different adapters, against the same
batch with every row on one adapter (the same bank) and against the single-adapter model
(unmerged); requests interleaved A B C A B C.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.train_throughput import OursStep, bench_config  # noqa: E402
from configs.sweeps.study import STUDY_ARMS  # noqa: E402
from lora_jax.lora.arms import ARMS
from lora_jax.run.assemble import build_bank_model, build_model
from lora_jax.serve import latency
from lora_jax.sharding import make_mesh  # noqa: E402

BATCH, SEQ = 4, 512


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def configs_for(arms, dtype):
    out = []
    for arm in arms:
        c = bench_config(ARMS[arm], dtype, "chunked", "none", BATCH, SEQ, scan_layers=True)
        c.arm = arm
        out.append(c)
    return out


def bench_training(arms, dtype, steps, rounds, mesh):
    configs = configs_for(arms, dtype)
    bank_model, _, _ = build_bank_model(configs, list(arms), mesh)
    joint = OursStep(configs[0], mesh, model=bank_model)
    one_config = configs_for(["all"], dtype)[0]
    one = OursStep(one_config, mesh, model=build_model(one_config, mesh)[0])
    joint_s, one_s = [], []
    for _ in range(rounds):
        joint_s.append(joint.run(steps))
        one_s.append(one.run(steps))
    j, o = statistics.median(joint_s), statistics.median(one_s)
    base_bytes = nbytes(joint.t.frozen)
    bank_bytes = nbytes((joint.lora, joint.opt))
    print(f"training ({dtype}, batch {BATCH} x {SEQ}, {len(arms)} arms: {', '.join(arms)})")
    print(f"  joint step      {j:8.3f} s   ({len(arms)} arms, one program, one base)")
    print(f"  one arm (all)   {o:8.3f} s")
    print(f"  joint / one     {j / o:8.2f} x   (acceptance: <= 3x; {len(arms)} separate jobs would be ~{len(arms)}x)")
    print(
        f"  memory: base {base_bytes / 2**20:.1f} MiB held once (K separate jobs: {len(arms) * base_bytes / 2**20:.1f} MiB); "
        f"bank adapters + AdamW {bank_bytes / 2**20:.1f} MiB"
    )
    for d in jax.local_devices()[:1]:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            print(f"  device peak memory {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")


def random_bank(arms, dtype, mesh):
    """A bank of the arms with random B (each arm padded exactly), and the 'all' arm alone."""
    configs = configs_for(arms, dtype)
    model, _, views = build_bank_model(configs, list(arms), mesh)
    _, bank_lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    keys = iter(jax.random.split(jax.random.key(0), 1024))
    arm_loras = [
        jax.tree.map(lambda s: 0.02 * jax.random.normal(next(keys), s.shape, jnp.float32), t) for t in views.templates
    ]
    nnx.update(model, views.stack_lora(bank_lora, arm_loras))
    k_all = list(arms).index("all") if "all" in arms else 0
    return model, views.arm_model(k_all, arm_loras[k_all], frozen), k_all


def bench_decoding(arms, dtype, requests, mesh):
    bank, single, k_one = random_bank(arms, dtype, mesh)
    k = len(arms)
    runners = {
        f"{k} adapters": latency.Requests(bank, k, 128, 64, adapter_ids=list(range(k))),
        "1 adapter (bank)": latency.Requests(bank, k, 128, 64, adapter_ids=[k_one] * k),
        "1 adapter (model)": latency.Requests(single, k, 128, 64),
    }
    for r in runners.values():  # warm-up (compilation)
        r.request()
        r.request()
    samples = {name: [] for name in runners}
    for _ in range(requests):
        for name, r in runners.items():
            samples[name].append(r.request())
    stats = {name: latency.summarize(s) for name, s in samples.items()}
    print(f"decoding ({dtype}, batch {k}, prompt 128, 64 new tokens, {requests} interleaved requests)")
    for name, s in stats.items():
        print(
            f"  {name:18s} TPOT p50 {s['tpot_ms_p50']:7.2f} ms  p95 {s['tpot_ms_p95']:7.2f} ms  "
            f"TTFT p50 {s['ttft_ms_p50']:7.1f} ms"
        )
    nine, one = stats[f"{k} adapters"]["tpot_ms_p95"], stats["1 adapter (bank)"]["tpot_ms_p95"]
    print(
        f"  TPOT p95 {k} adapters / 1 adapter: {nine / one:.3f} x (acceptance: <= 1.1x); "
        f"/ single-adapter model: {nine / stats['1 adapter (model)']['tpot_ms_p95']:.3f} x"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default=",".join(STUDY_ARMS["cocohd"]))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--skip", choices=("train", "decode"), default=None)
    args = p.parse_args()
    arms = tuple(args.arms.split(","))
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if args.skip != "train":
        bench_training(arms, args.dtype, args.steps, args.rounds, mesh)
    if args.skip != "decode":
        bench_decoding(arms, args.dtype, args.requests, mesh)


if __name__ == "__main__":
    main()
