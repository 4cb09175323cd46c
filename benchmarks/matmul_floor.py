"""The train step's matmul floor: every dot_general of our LoRA train step, run alone, on XLA and on torch.

    python benchmarks/matmul_floor.py [--arms o_proj,all] [--rounds 3] [--steps 4]

Per arm, in interleaved rounds in one process (the host drifts, so only ratios are claims):
- our whole train step and PEFT's (the pinned peer of train_throughput.py), on the bench model;
- "XLA dots": every dot_general of our step's jaxpr, counted as often as it runs (scan bodies times
  their length), in one jitted program, each call with its own operands: what our step's matmuls
  cost on XLA:CPU with nothing else around them;
- "torch dots": the same matmuls (same shapes, same contractions) through torch.einsum.
It then prints the step time that 1.15x PEFT's throughput needs and how much of it the XLA dots
alone take. If they take nearly all of it, no change outside the matmuls can reach that speed.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.extend import core as jex_core  # noqa: E402

# A dot: (lhs shape, rhs shape, dtype name, dot_general's dimension_numbers).
Dot = tuple


def step_dots(fn, *args) -> collections.Counter:
    """Every dot_general that `fn(*args)` runs, with how many times it runs (a scan body's dots count
    `length` times). A while loop has no static trip count: it is refused rather than miscounted."""
    dots: collections.Counter = collections.Counter()

    def walk(jaxpr, times):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                lhs, rhs = eqn.invars
                dots[(lhs.aval.shape, rhs.aval.shape, str(lhs.aval.dtype), eqn.params["dimension_numbers"])] += times
            if name == "while":
                raise ValueError("a while loop in the step: its dots' trip count is not static")
            inner = times * eqn.params["length"] if name == "scan" else times
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jex_core.ClosedJaxpr):
                        walk(sub.jaxpr, inner)
                    elif isinstance(sub, jex_core.Jaxpr):
                        walk(sub, inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr, 1)
    return dots


def dot_flops(dot: Dot) -> int:
    """2 x (output elements) x (contracted size)."""
    lhs, rhs, _, ((lc, rc), (lb, _)) = dot
    contracted = math.prod(lhs[i] for i in lc)
    batch = math.prod(lhs[i] for i in lb)
    return 2 * math.prod(lhs) * math.prod(rhs) // contracted // batch


def einsum_spec(dot: Dot) -> str:
    """dot_general's dimension numbers as an einsum string (output: batch, lhs free, rhs free: the
    order dot_general returns)."""
    lhs, rhs, _, ((lc, rc), (lb, rb)) = dot
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    a = [next(letters) for _ in lhs]
    b = [next(letters) for _ in rhs]
    for i, j in list(zip(lc, rc)) + list(zip(lb, rb)):
        b[j] = a[i]
    out = [a[i] for i in lb]
    out += [c for i, c in enumerate(a) if i not in lc and i not in lb]
    out += [c for j, c in enumerate(b) if j not in rc and j not in rb]
    return f"{''.join(a)},{''.join(b)}->{''.join(out)}"


class DotsAlone:
    """The given dots, each call with its own random float32 operands, on XLA (one jitted program) and
    on torch (einsum per call); `xla()` and `torch()` -> seconds for all of them once."""

    def __init__(self, dots: collections.Counter, seed: int = 0):
        import torch

        rng = np.random.default_rng(seed)
        self.calls = [d for d, n in dots.items() for _ in range(n)]
        host = [(rng.standard_normal(d[0], np.float32), rng.standard_normal(d[1], np.float32)) for d in self.calls]
        self.jax_ops = jax.device_put(host)
        self.torch_ops = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in host]
        self.specs = [einsum_spec(d) for d in self.calls]
        numbers = [d[3] for d in self.calls]
        self._run = jax.jit(lambda ops: [jax.lax.dot_general(a, b, n) for (a, b), n in zip(ops, numbers)])
        self.xla()
        self.torch()

    def xla(self) -> float:
        start = time.perf_counter()
        jax.block_until_ready(self._run(self.jax_ops))
        return time.perf_counter() - start

    def torch(self) -> float:
        import torch

        start = time.perf_counter()
        for spec, (a, b) in zip(self.specs, self.torch_ops):
            torch.einsum(spec, a, b)
        return time.perf_counter() - start


def main():
    from benchmarks.train_throughput import OursStep, PeftStep, bench_config, peer_settings
    from lora_jax.sharding import make_mesh

    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", default="o_proj,all")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    print(peer_settings())
    print("float32, batch 4 x 512; seconds, medians over rounds; the dots are timed 3x per round")
    print(
        f"{'arm':<10}{'ours':>7}{'PEFT':>7}{'XLA dots':>10}{'torch dots':>11}{'dots GF':>9}{'1.15x PEFT':>11}  XLA dots / 1.15x"
    )
    for arm in args.arms.split(","):
        targets = ("qkv", "o_proj", "fc1", "fc2") if arm == "all" else tuple(arm.split("+"))
        ours = OursStep(bench_config(targets, "float32", "causal_blocks", "none", 4, 512), mesh)
        dots = step_dots(ours.c.train_step, ours.lora, ours.opt, ours.c.frozen, ours.batch, 0)
        flops = sum(dot_flops(d) * n for d, n in dots.items())
        alone = DotsAlone(dots)
        peft = PeftStep(targets, 4, 512)
        rounds = []
        for _ in range(args.rounds):
            o, p = ours.run(args.steps), peft.run(args.steps)
            x = statistics.median(alone.xla() for _ in range(3))
            t = statistics.median(alone.torch() for _ in range(3))
            rounds.append((o, p, x, t))
        o, p, x, t = (statistics.median(c) for c in zip(*rounds))
        need = p / 1.15
        print(
            f"{arm:<10}{o:>7.3f}{p:>7.3f}{x:>10.3f}{t:>11.3f}{flops / 1e9:>9.1f}{need:>11.3f}  {x / need:.2f}",
            flush=True,
        )
        print(
            f"{'':<10}{sum(dots.values())} dots; XLA {flops / x / 1e9:.0f} GFLOP/s, torch {flops / t / 1e9:.0f}; "
            f"our step minus its dots {o - x:.3f} s; 1.15x PEFT leaves {need - x:.3f} s beside the dots",
            flush=True,
        )
        del alone, peft, ours


if __name__ == "__main__":
    main()
