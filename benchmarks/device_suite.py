"""The accelerator figures in one command: writes JSON and prints a table.

    python benchmarks/device_suite.py [--out device_suite.json] [--shape 1b|tiny] [--sections train,decode,joint,overhead]

Sections (each on one device, random weights, Llama shape):
  train     training tok/s and MFU of the arms o_proj, o_proj+fc2 and all (LoRA rank 16), median
            of the timed steps after one compiled warm-up step;
  decode    TTFT and TPOT p50/p95 of the base model, the o_proj+fc2 adapters unmerged, and merged,
            at batch 1 and 16 (requests interleaved variant by variant, lora_jax.serve.latency);
  joint     one step of the study's nine arms trained jointly (an AdapterBank over one base) against
            one step of the arm "all" alone, on the same rows;
  overhead  TPOT p50/p95 of each of the nine arms unmerged against the base model, batch 1: the
            study's question (+29% TPOT p95 for o_proj+fc2 served unmerged).

Shapes: "1b" is Llama 3.2 1B's (hidden 2048, 16 layers, 32 heads / 8 kv heads, vocab 128256,
intermediate 8192, tied embeddings), bfloat16 weights and compute, sequence 2048; "tiny" is a
seconds-long CPU run of every code path (the test suite runs it).

MFU = the training step's FLOPs (lora_jax.train.accounting, the one definition used everywhere) /
step time / peak. On a GPU or TPU the peak is the datasheet dense bf16 peak of the device found
(`DATASHEET_BF16_PEAK`, named in the output); a device not in the table, and the CPU, use the best
of timed n^3 matmuls in the compute dtype measured in this process (n = 2048 on CPU, 8192 else). The measured matmul peak is
reported beside the datasheet's either way.

It imports only jax, flax, optax, numpy and lora_jax's model, LoRA, training and serving code (no
ml-collections, clu, tensorflow-datasets or torch), so it runs on a machine that has only jax.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The joint step holds 9 x 2048 tokens of activations at the 1B shape: let jax take most of a GPU's
# memory rather than its default 75% (a user's own setting wins).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.step_timer import TimedStep, synthetic_batch  # noqa: E402
from lora_jax.lora.arms import ARMS  # noqa: E402
from lora_jax.lora.bank import AdapterBank  # noqa: E402
from lora_jax.lora.spec import LoraSpec  # noqa: E402
from lora_jax.model.config import ModelConfig  # noqa: E402
from lora_jax.model.transformer import RuntimeOptions, Transformer  # noqa: E402
from lora_jax.serve import latency  # noqa: E402
from lora_jax.sharding import make_mesh, shard_model  # noqa: E402
from lora_jax.train import accounting  # noqa: E402
from lora_jax.train.step import StepOptions, compile_steps, make_optimizer  # noqa: E402

SECTIONS = ("train", "decode", "joint", "overhead")
TRAIN_ARMS = {"o_proj": ("o_proj",), "o_proj+fc2": ("o_proj", "fc2"), "all": ARMS["all"]}
RANK, ALPHA = 16, 32.0

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s, matched as whole
# words against jax's device_kind in this order (first hit wins: "H100 NVL" before "H100", "TPU v5
# lite" (v5e) before "TPU v5" (jax's kind for a v5p)). An H100/H200 whose kind names neither NVL nor
# PCIe is taken as the SXM part.
DATASHEET_BF16_PEAK = (
    ("H200 NVL", 835.5e12, "NVIDIA H200 NVL datasheet: 835.5 TFLOP/s bf16 dense"),
    ("H200", 989.5e12, "NVIDIA H200 SXM datasheet: 989.5 TFLOP/s bf16 dense"),
    ("H100 NVL", 835.5e12, "NVIDIA H100 NVL datasheet: 835.5 TFLOP/s bf16 dense"),
    ("H100 PCIe", 756e12, "NVIDIA H100 PCIe datasheet: 756 TFLOP/s bf16 dense"),
    ("H100", 989.5e12, "NVIDIA H100 SXM datasheet: 989.5 TFLOP/s bf16 dense"),
    ("A100", 312e12, "NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense"),
    ("L40S", 362.05e12, "NVIDIA L40S datasheet: 362 TFLOP/s bf16 dense"),
    ("L40", 181.05e12, "NVIDIA L40 datasheet: 181 TFLOP/s bf16 dense"),
    ("L4", 121e12, "NVIDIA L4 datasheet: 121 TFLOP/s bf16 dense"),
    ("TPU v6 lite", 918e12, "Google TPU v6e (Trillium): 918 TFLOP/s bf16 per chip"),
    ("TPU v5 lite", 197e12, "Google TPU v5e: 197 TFLOP/s bf16 per chip"),
    ("TPU v5p", 459e12, "Google TPU v5p: 459 TFLOP/s bf16 per chip"),
    ("TPU v5", 459e12, "Google TPU v5p: 459 TFLOP/s bf16 per chip"),
    ("TPU v4", 275e12, "Google TPU v4: 275 TFLOP/s bf16 per chip"),
)


@dataclasses.dataclass(frozen=True)
class Shape:
    model: ModelConfig
    dtype: str
    batch: int  # training rows per step
    seq_len: int
    joint_batch: int  # rows of the joint step (every arm sees each: K x rows through the model)
    train_steps: int
    prompt_len: int
    new_tokens: int
    decode_batches: tuple[int, ...]
    requests: int
    overhead_requests: int


SHAPES = {
    "1b": Shape(
        ModelConfig(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_layers=16,
            num_heads=32,
            num_kv_heads=8,
            head_dim=64,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        ),
        dtype="bfloat16",
        # Without remat a 2048-token row keeps ~7 GB of activations at this shape, by estimate (the
        # causal blocks' float32 attention probabilities, ~4.4 GB, are most of it): 4 rows for one
        # arm, 1 row x 9 arms for the joint step.
        batch=4,
        seq_len=2048,
        joint_batch=1,
        train_steps=8,
        prompt_len=512,
        new_tokens=64,
        decode_batches=(1, 16),
        requests=10,
        overhead_requests=8,
    ),
    "tiny": Shape(
        ModelConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            max_position_embeddings=256,
        ),
        dtype="bfloat16",  # the accelerator's dtype: the tiny CPU run takes the same code path
        batch=2,
        seq_len=128,
        joint_batch=1,
        train_steps=2,
        prompt_len=16,
        new_tokens=4,
        decode_batches=(1, 2),
        requests=2,
        overhead_requests=1,
    ),
}


def datasheet_peak(device_kind: str) -> tuple[float, str] | None:
    """(FLOP/s, source) of the first DATASHEET_BF16_PEAK entry whose key the device kind contains."""
    for key, flops, source in DATASHEET_BF16_PEAK:
        if re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", device_kind, re.IGNORECASE):
            return flops, source
    return None


def peak_flops(device, dtype) -> dict:
    """{"flops", "source", "measured_matmul_flops"}: an accelerator's datasheet peak where the table
    has it, else (and on CPU) the measured one."""
    measured = measure_matmul(device, dtype)
    sheet = datasheet_peak(device.device_kind) if device.platform != "cpu" else None
    if sheet:
        return {"flops": sheet[0], "source": sheet[1], "measured_matmul_flops": measured}
    return {
        "flops": measured,
        "source": f"measured: best of 5 {np.dtype(dtype).name} n^3 matmuls on {device.device_kind}",
        "measured_matmul_flops": measured,
    }


def measure_matmul(device, dtype) -> float:
    """Best of 5 timed n^3 matmuls: n = 2048 on CPU; 8192 on an accelerator, where a 2048^3 product
    (~20 us on an H200) would time the launch and the sync more than the matmul."""
    return accounting.measure_matmul_peak(2048 if device.platform == "cpu" else 8192, device=device, dtype=dtype)


def options(shape: Shape, attention: str) -> RuntimeOptions:
    dt = jnp.dtype(shape.dtype)
    return RuntimeOptions(param_dtype=dt, compute_dtype=dt, attention_impl=attention)


def build_base(cfg: ModelConfig, opts: RuntimeOptions, mesh) -> Transformer:
    """The random base every section's models share (drawn once: at 1B a draw takes seconds)."""
    model = Transformer(cfg, None, opts, rngs=nnx.Rngs(0))
    shard_model(model, mesh)
    return model


def with_adapters(base: Transformer, lora, mesh, random_b: bool = False) -> Transformer:
    """`base`'s weights (shared, not copied) with fresh adapters `lora` (a LoraSpec or an AdapterBank):
    A random, B zero as PEFT starts, or B random too (random_b: a trained adapter, for decoding)."""
    model = nnx.eval_shape(lambda: Transformer(base.config, lora, base.options, rngs=nnx.Rngs(0)))
    nnx.update(model, nnx.state(base))
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
        shape = var.get_value().shape
        scale = 0.0 if path[-1] == "lora_b" and not random_b else 0.01
        var.set_value(scale * jax.random.normal(jax.random.key(i), shape, jnp.float32))
    shard_model(model, mesh)
    return model


def timed_step(model: Transformer, rows: int, seq_len: int, mesh) -> TimedStep:
    """`model`'s step with AdamW (as the trainer builds it) on a synthetic batch of rows x seq_len."""
    bank = model.lora if isinstance(model.lora, AdapterBank) else None
    tx, schedule = make_optimizer(1e-4, 0, 1000, 0.0, 1.0, bank)
    steps = compile_steps(model, tx, schedule, StepOptions(loss_chunk_tokens=512), mesh)
    return TimedStep(steps, synthetic_batch(rows, seq_len, model.config.vocab_size))


def section_train(shape: Shape, base, mesh, peak) -> list[dict]:
    rows = []
    for arm, targets in TRAIN_ARMS.items():
        spec = LoraSpec(targets=targets, rank=RANK, alpha=ALPHA)
        step = timed_step(with_adapters(base, spec, mesh), shape.batch, shape.seq_len, mesh)
        step_s = statistics.median(step.times(shape.train_steps))
        flops = accounting.train_flops_per_step(shape.model, spec, shape.batch, shape.seq_len)
        rows.append(
            {
                "arm": arm,
                "step_s": step_s,
                "tokens_per_s": shape.batch * shape.seq_len / step_s,
                "tflop_per_step": flops / 1e12,
                "mfu": flops / step_s / peak["flops"],
                "of_measured_matmul_peak": flops / step_s / peak["measured_matmul_flops"],
                "compile_s": step.compile_s,
            }
        )
        del step
    return rows


def section_decode(shape: Shape, base, mesh) -> list[dict]:
    spec = LoraSpec(targets=TRAIN_ARMS["o_proj+fc2"], rank=RANK, alpha=ALPHA)
    model = with_adapters(base, spec, mesh, random_b=True)
    rows = []
    for batch in shape.decode_batches:
        out = latency.measure(model, batch, shape.prompt_len, shape.new_tokens, shape.requests, mesh="single")
        for variant, stats in out["variants"].items():
            rows.append({"arm": "o_proj+fc2", "variant": variant, "batch": batch, **stats})
    return rows


def section_joint(shape: Shape, base, mesh) -> dict:
    names = tuple(ARMS)
    bank = AdapterBank(names, tuple(LoraSpec(targets=ARMS[n], rank=RANK, alpha=ALPHA) for n in names))
    rows, seq, steps = shape.joint_batch, shape.seq_len, shape.train_steps
    joint = timed_step(with_adapters(base, bank, mesh), rows, seq, mesh)
    one = timed_step(with_adapters(base, LoraSpec(targets=ARMS["all"], rank=RANK, alpha=ALPHA), mesh), rows, seq, mesh)
    joint_s, one_s = [], []
    for _ in range(steps):  # interleaved: joint, one, joint, one, ...
        joint_s += joint.times(1)
        one_s += one.times(1)
    j, o = statistics.median(joint_s), statistics.median(one_s)
    return {"arms": len(names), "rows": rows, "joint_step_s": j, "one_arm_all_step_s": o, "ratio": j / o}


def section_overhead(shape: Shape, base_model, mesh) -> list[dict]:
    """Each study arm unmerged against the base model at batch 1, requests interleaved base, arm. An
    arm that fails is a row with its error; the others still run."""
    base = latency.Requests(base_model, 1, shape.prompt_len, shape.new_tokens)
    for _ in range(2):
        base.request()
    rows = []
    for name, targets in ARMS.items():
        try:
            spec = LoraSpec(targets=targets, rank=RANK, alpha=ALPHA)
            model = with_adapters(base_model, spec, mesh, random_b=True)
            arm = latency.Requests(model, 1, shape.prompt_len, shape.new_tokens)
            for _ in range(2):
                arm.request()
            b, a = [], []
            for _ in range(shape.overhead_requests):
                b.append(base.request())
                a.append(arm.request())
        except Exception as e:  # e.g. out of device memory
            rows.append({"arm": name, "error": _error_line(e)})
            continue
        sb, sa = latency.summarize(b), latency.summarize(a)
        rows.append(
            {
                "arm": name,
                "base_tpot_ms_p50": sb["tpot_ms_p50"],
                "base_tpot_ms_p95": sb["tpot_ms_p95"],
                "unmerged_tpot_ms_p50": sa["tpot_ms_p50"],
                "unmerged_tpot_ms_p95": sa["tpot_ms_p95"],
                "overhead_p50": sa["tpot_ms_p50"] / sb["tpot_ms_p50"] - 1,
                "overhead_p95": sa["tpot_ms_p95"] / sb["tpot_ms_p95"] - 1,
            }
        )
        del arm, model
    return rows


def _error_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def print_header(result: dict) -> None:
    print(f"device {result['device']} ({result['platform']}), jax {result['jax']}, shape {result['shape']}")
    peak = result["peak"]
    print(f"peak {peak['flops'] / 1e12:.1f} TFLOP/s ({peak['source']})")
    print(f"measured matmul {peak['measured_matmul_flops'] / 1e12:.1f} TFLOP/s", flush=True)


def print_section(result: dict, name: str) -> None:
    """The table of one finished section (printed as soon as it finishes)."""
    if name in result.get("errors", {}):
        print(f"\nsection {name} failed: {result['errors'][name]}", flush=True)
        return
    if name == "train":
        print(f"\ntrain ({result['dtype']}, {result['train_rows']} x {result['seq_len']}, rank {RANK})")
        print(f"{'arm':<12}{'step s':>9}{'tok/s':>10}{'TFLOP':>8}{'MFU':>7}{'of meas.':>9}{'compile s':>10}")
        for r in result["train"]:
            print(
                f"{r['arm']:<12}{r['step_s']:>9.4f}{r['tokens_per_s']:>10.0f}{r['tflop_per_step']:>8.2f}"
                f"{r['mfu']:>7.1%}{r['of_measured_matmul_peak']:>9.1%}{r['compile_s']:>10.1f}"
            )
    elif name == "decode":
        print(f"\ndecode (prompt {result['prompt_len']}, {result['new_tokens']} new tokens, greedy; ms)")
        print(f"{'arm':<12}{'variant':<10}{'batch':>6}{'TTFT p50':>10}{'TTFT p95':>10}{'TPOT p50':>10}{'TPOT p95':>10}")
        for r in result["decode"]:
            print(
                f"{r['arm']:<12}{r['variant']:<10}{r['batch']:>6}{r['ttft_ms_p50']:>10.2f}{r['ttft_ms_p95']:>10.2f}"
                f"{r['tpot_ms_p50']:>10.3f}{r['tpot_ms_p95']:>10.3f}"
            )
    elif name == "joint":
        j = result["joint"]
        print(
            f"\njoint: {j['arms']} arms in one step {j['joint_step_s']:.4f} s; arm 'all' alone "
            f"{j['one_arm_all_step_s']:.4f} s; ratio {j['ratio']:.2f} ({j['rows']} rows x {result['seq_len']})"
        )
    elif name == "overhead":
        print("\nunmerged vs base, batch 1 (TPOT ms)")
        print(f"{'arm':<12}{'base p50':>9}{'arm p50':>9}{'+p50':>8}{'base p95':>10}{'arm p95':>9}{'+p95':>8}")
        for r in result["overhead"]:
            if "error" in r:
                print(f"{r['arm']:<12}failed: {r['error']}")
                continue
            print(
                f"{r['arm']:<12}{r['base_tpot_ms_p50']:>9.3f}{r['unmerged_tpot_ms_p50']:>9.3f}{r['overhead_p50']:>8.1%}"
                f"{r['base_tpot_ms_p95']:>10.3f}{r['unmerged_tpot_ms_p95']:>9.3f}{r['overhead_p95']:>8.1%}"
            )
    print(f"({result['seconds'][name]:.0f} s)", flush=True)


def run(shape_name: str, sections, attention: str, out: str) -> dict:
    """Runs the sections in order; after each, prints its table and rewrites `out` (a run cut short
    by a time limit keeps what it finished)."""
    start = time.perf_counter()
    shape = SHAPES[shape_name]
    device = jax.devices()[0]
    mesh = make_mesh((1, 1, 1), devices=[device])
    result = {
        "device": device.device_kind,
        "platform": device.platform,
        "jax": jax.__version__,
        "shape": shape_name,
        "model": _model_fields(shape.model),
        "dtype": shape.dtype,
        "attention_impl": attention,
        "train_rows": shape.batch,
        "seq_len": shape.seq_len,
        "prompt_len": shape.prompt_len,
        "new_tokens": shape.new_tokens,
        "peak": peak_flops(device, shape.dtype),
        "seconds": {},
    }
    print_header(result)
    base = build_base(shape.model, options(shape, attention), mesh)
    run_section = {
        "train": lambda: section_train(shape, base, mesh, result["peak"]),
        "decode": lambda: section_decode(shape, base, mesh),
        "joint": lambda: section_joint(shape, base, mesh),
        "overhead": lambda: section_overhead(shape, base, mesh),
    }
    for name in sections:
        t0 = time.perf_counter()
        try:
            result[name] = run_section[name]()
        except Exception as e:  # e.g. out of device memory: the other sections still run and report
            result.setdefault("errors", {})[name] = _error_line(e)
        result["seconds"][name] = time.perf_counter() - t0
        result["seconds"]["total"] = time.perf_counter() - start
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            result["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print_section(result, name)
    return result


def _model_fields(cfg: ModelConfig) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
    return {k: getattr(cfg, k) for k in keys}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--attention", default="causal_blocks", help="model.attention_impl of the training steps")
    p.add_argument("--out", default="device_suite.json")
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; valid: {', '.join(SECTIONS)}")
    result = run(args.shape, sections, args.attention, args.out)
    print(f"\n{result['seconds']['total']:.0f} s in all; JSON: {args.out}")
    return 1 if result.get("errors") or any("error" in r for r in result.get("overhead", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
