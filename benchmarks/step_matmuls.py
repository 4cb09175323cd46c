"""The train step's matmuls: how long they run inside our LoRA train step, and alone on XLA and torch.

    python benchmarks/step_matmuls.py [--arms o_proj,all] [--rounds 3] [--steps 4]
    XLA_FLAGS="--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot" python benchmarks/step_matmuls.py

Per arm (bench model, float32, batch 4 x 512), in interleaved rounds in one process (the host drifts,
so only ratios are claims):
- our whole train step and PEFT's (the pinned peer of train_throughput.py);
- "alone": every dot_general of our step's jaxpr, counted as often as it runs (a scan body's dots
  times its length), each distinct one timed alone (median of 5 calls, operands resident, its output
  written fresh each call) and summed over its count, on XLA (jitted `lax.dot_general`) and on
  torch (`torch.einsum`, the same shapes and contractions): the two libraries' per-shape rates;
- "inside our step": a profile of our step and the wall time during which at least one of its dots
  runs (needs TensorFlow's profiler protos, as the test environment has). Dots that overlap each
  other or other work count once, so this can be below the "alone" sum.
It prints the step time that 1.15x PEFT's throughput needs, the MFU that needs (against the float32
2048^3 matmul peak measured in this process, as train_throughput.py's MFU), and the time our step
spends with no dot running beside what 1.15x PEFT would leave for it.
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.extend import core as jex_core  # noqa: E402

# A dot: (lhs shape, rhs shape, dtype name, dot_general's dimension_numbers).
Dot = tuple


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(sub, jex_core.ClosedJaxpr):
                yield sub.jaxpr
            elif isinstance(sub, jex_core.Jaxpr):
                yield sub


def step_dots(fn, *args) -> collections.Counter:
    """Every dot_general that `fn(*args)` runs, with how many times it runs (a scan body's dots count
    `length` times). A while loop (no static trip count) or a cond (no static branch) around dots is
    refused rather than miscounted."""

    def walk(jaxpr, times, dots):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                lhs, rhs = eqn.invars
                dots[(lhs.aval.shape, rhs.aval.shape, str(lhs.aval.dtype), eqn.params["dimension_numbers"])] += times
            inner = times * eqn.params["length"] if name == "scan" else times
            found = collections.Counter()
            for sub in _sub_jaxprs(eqn):
                walk(sub, inner, found)
            if found and name in ("while", "cond"):
                raise ValueError(f"dots under a {name} in the step: how often they run is not static")
            dots.update(found)

    dots: collections.Counter = collections.Counter()
    walk(jax.make_jaxpr(fn)(*args).jaxpr, 1, dots)
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


class DotAlone:
    """One dot on random float32 operands, on XLA (jitted `lax.dot_general`) and on torch (einsum)."""

    def __init__(self, dot: Dot, seed: int = 0):
        import torch

        if dot[2] != "float32":
            raise ValueError(f"float32 dots only (the bench step's), got {dot[2]}")
        rng = np.random.default_rng(seed)
        a, b = (rng.standard_normal(shape, np.float32) for shape in dot[:2])
        self.jax_ops = jax.device_put((a, b))
        self.torch_ops = (torch.from_numpy(a), torch.from_numpy(b))
        self.spec, numbers = einsum_spec(dot), dot[3]
        self._xla = jax.jit(lambda a, b: jax.lax.dot_general(a, b, numbers))

    def xla(self):
        return self._xla(*self.jax_ops)

    def torch(self):
        import torch

        return torch.einsum(self.spec, *self.torch_ops)

    def seconds(self, repeats: int = 5) -> tuple[float, float]:
        """(XLA, torch): the median of `repeats` calls each, after one untimed call."""

        def median(call, wait):
            wait(call())
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                wait(call())
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        return median(self.xla, jax.block_until_ready), median(self.torch, lambda x: x)


# Ops that only move or reshape data: a dot fusion holding nothing else is a matmul.
LAYOUT_OPS = {"parameter", "bitcast", "transpose", "copy", "reshape", "broadcast", "constant", "slice", "convert"}


def dot_instructions(hlo_text: str) -> tuple[dict[str, set[str]], set[str]]:
    """({name: other ops}, executed): the compiled module's instructions that run a dot (a `dot`, or a
    fusion, e.g. a YNNPACK one, whose computation holds one), each with the non-layout ops fused with
    it (work a profile would count as the dot's); and which of them the runtime runs itself (not
    inside a fusion), so that a profile shows events named after them."""
    computation, ops, calls, home = None, collections.defaultdict(set), {}, {}
    for line in hlo_text.splitlines():
        if match := re.match(r"^(?:ENTRY )?%(\S+) \(", line):
            computation = match.group(1)
        elif match := re.match(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][\w-]*)\(", line):
            name, opcode = match.groups()
            ops[computation].add(opcode)
            home[name] = computation
            if opcode == "dot":
                calls[name] = None
            elif opcode == "fusion" and (called := re.search(r"calls=%([^,\s}]+)", line)):
                calls[name] = called.group(1)
    fused = {c for c in calls.values() if c is not None}
    dots = {
        n: set() if c is None else ops[c] - LAYOUT_OPS - {"dot"}
        for n, c in calls.items()
        if c is None or "dot" in ops[c]
    }
    return dots, {n for n in dots if home[n] not in fused}


def _union_seconds(intervals) -> float:
    """Picosecond intervals -> seconds covered by at least one of them."""
    total, end = 0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total, end = total + stop - start, stop
        elif stop > end:
            total, end = total + stop - end, stop
    return total / 1e12


def traced_seconds(run, hlo_text: str, steps: int, workdir: str) -> tuple[float, float, dict[str, set[str]]]:
    """Profiles `steps` calls of `run` (one execution of the compiled module `hlo_text`, waited for)
    and returns, per step: the call's median seconds, the wall time during which at least one of the
    module's dots was running (on any thread: a dot split over both cores, or two dots at once, count
    once), and the dot fusions that also computed something else, with those ops (their time counts
    as the dots'). Reads the profile with TensorFlow's XPlane proto."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    dot_ops, executed = dot_instructions(hlo_text)
    step_s = []
    with jax.profiler.trace(workdir):
        for _ in range(steps):
            start = time.perf_counter()
            run()
            step_s.append(time.perf_counter() - start)
    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(workdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    dots, seen = [], collections.Counter()
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if name in dot_ops:  # events carry the instruction's name
                    start = line.timestamp_ns * 1000 + event.offset_ps
                    dots.append((start, start + event.duration_ps))
                    seen[name] += 1
    missing = sorted(n for n in executed if seen[n] < steps)
    if missing:
        raise RuntimeError(f"the profile in {workdir} lacks dots of the module ({len(missing)}, e.g. {missing[:3]})")
    mixed = {n: o for n, o in dot_ops.items() if o and seen[n]}
    return statistics.median(step_s), _union_seconds(dots) / steps, mixed


def alone_seconds(alone: dict, dots: collections.Counter, repeats: int = 5) -> tuple[float, float]:
    """(XLA, torch): each distinct dot's median time, summed over how often the step runs it. alone:
    {dot: DotAlone}, built once (each DotAlone compiles its dot on first use)."""
    xla = torch = 0.0
    for dot, n in dots.items():
        x, t = alone[dot].seconds(repeats)
        xla, torch = xla + n * x, torch + n * t
    return xla, torch


def main():
    from benchmarks.train_throughput import OursStep, PeftStep, bench_config, peer_settings
    from lora_jax.run.config import lora_spec, random_model_config
    from lora_jax.sharding import make_mesh
    from lora_jax.train import accounting

    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", default="o_proj,all")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    print(peer_settings())
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; float32, batch 4 x 512; seconds, medians of the rounds")
    for arm in args.arms.split(","):
        targets = ("qkv", "o_proj", "fc1", "fc2") if arm == "all" else tuple(arm.split("+"))
        config = bench_config(targets, "float32", "causal_blocks", "none", 4, 512)
        ours = OursStep(config, mesh)
        dots = step_dots(ours.c.train_step, ours.lora, ours.opt, ours.c.frozen, ours.batch, 0)
        flops = sum(dot_flops(d) * n for d, n in dots.items())
        counted = accounting.train_flops_per_step(random_model_config(config), lora_spec(config), 4, 512)
        alone = {dot: DotAlone(dot) for dot in dots}
        peft = PeftStep(targets, 4, 512)
        rounds = []
        for r in range(args.rounds):
            o, p = ours.run(args.steps), peft.run(args.steps)
            x, t = alone_seconds(alone, dots)
            rounds.append((o, p, x, t, accounting.measure_matmul_peak()))
            print(f"  {arm} round {r}: ours {o:.3f}  PEFT {p:.3f}  XLA dots alone {x:.3f}  torch {t:.3f}", flush=True)
        o, p, x, t, peak = (statistics.median(c) for c in zip(*rounds))
        with tempfile.TemporaryDirectory() as workdir:
            hlo = ours.c.train_step.lower(ours.lora, ours.opt, ours.c.frozen, ours.batch, 0).compile().as_text()
            traced_step, in_step, mixed = traced_seconds(lambda: ours.times(1), hlo, args.steps, workdir)
        need = p / 1.15
        print(
            f"{arm}: {sum(dots.values())} dots, {flops / 1e9:.1f} GFLOP (accounting's MFU count {counted / 1e9:.1f}); "
            f"float32 peak {peak / 1e9:.0f} GFLOP/s\n"
            f"  ours {o:.3f} s (MFU {counted / o / peak:.1%}), PEFT {p:.3f} s; "
            f"1.15x PEFT needs {need:.3f} s (MFU {counted / need / peak:.1%})\n"
            f"  inside our step (a profile): a dot runs during {in_step:.3f} s of {traced_step:.3f} s; alone: "
            f"XLA {x:.3f} s ({flops / x / 1e9:.0f} GFLOP/s), torch {t:.3f} s ({flops / t / 1e9:.0f} GFLOP/s)\n"
            f"  no dot runs during {traced_step - in_step:.3f} s of our step; 1.15x PEFT would leave "
            f"{need - in_step:.3f} s for that",
            flush=True,
        )
        if mixed:
            print(f"  (dot fusions that also compute, counted as dots: {sorted(mixed.items())[:5]})")


if __name__ == "__main__":
    main()
