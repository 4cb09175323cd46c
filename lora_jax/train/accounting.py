"""Trainable-parameter counts and FLOPs, with the one definition of MFU used everywhere.

Per token:
  forward  = 2 x (every matmul weight, LoRA included, LM head included, embedding gather excluded)
             + causal attention 2 x 2 x layers x (T/2) x heads x head_dim
  frozen-base LoRA training step = forward
             + input-gradient backward (= forward's matmul term, 2 x forward's attention term)
             + LoRA weight-gradient terms (2 x LoRA params)
MFU = achieved FLOP/s / the best of >= 5 timed float32 2048^3 matmuls in the same process.
Under the layer scan, a train step on the plain LoRA path (`fused_lora_matmul=False`; the fused
float32 path forms each adapted W + s·A·B per call instead) runs exactly this count's dots, plus
the masked score entries its attention kernel computes anyway (`xla`: half of every score matrix;
`causal_blocks`: half of each diagonal block); tests/benchmarks/test_step_matmuls.py counts them.
With the layers unrolled, autodiff also skips layer 0's input gradients upstream of its first
adapter (nothing below needs them), which this count keeps. On the bench model's unrolled, fused,
causal-block step (benchmarks/train_throughput.py) the count is 0.8% below (`qkv`) to 2.6% above
(`fc2`) the dots that run; `o_proj` 0.5% above.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from lora_jax.lora.spec import LoraSpec
from lora_jax.model.config import ModelConfig
from lora_jax.model.transformer import target_shapes


def lora_params_per_target(cfg: ModelConfig, spec: LoraSpec | None) -> dict[str, int]:
    """Trainable LoRA parameters of each target over all layers (fused qkv/fc1 share one A)."""
    if spec is None:
        return {}
    out = {}
    for t in spec.targets:
        in_dims, out_dims, _, _ = target_shapes(cfg)[t]
        n_in, n_out = math.prod(in_dims), math.prod(out_dims)
        out[t] = spec.num_adapted_layers(cfg.num_layers) * spec.rank_for(t) * (n_in + n_out)
    return out


def peft_equivalent_params_per_target(cfg: ModelConfig, spec: LoraSpec) -> dict[str, int]:
    """What PEFT's separate q/k/v (gate/up) adapters of the same rank would train, for comparison."""
    e, d = cfg.hidden_size, cfg.head_dim
    split = {
        "qkv": [(e, cfg.num_heads * d), (e, cfg.num_kv_heads * d), (e, cfg.num_kv_heads * d)],
        "o_proj": [(cfg.num_heads * d, e)],
        "fc1": [(e, cfg.intermediate_size)] * 2,
        "fc2": [(cfg.intermediate_size, e)],
    }
    layers = spec.num_adapted_layers(cfg.num_layers)
    return {t: layers * sum(spec.rank_for(t) * (i + o) for i, o in split[t]) for t in spec.targets}


def base_matmul_params(cfg: ModelConfig) -> int:
    """Frozen matmul weights: all projections of all layers + the LM head (the embedding is a gather)."""
    per_layer = sum(math.prod(i) * math.prod(o) for i, o, _, _ in target_shapes(cfg).values())
    return cfg.num_layers * per_layer + cfg.hidden_size * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 2 * 2 * cfg.num_layers * (seq_len / 2) * cfg.num_heads * cfg.head_dim


def forward_flops_per_token(cfg: ModelConfig, spec: LoraSpec | None, seq_len: int) -> float:
    lora = sum(lora_params_per_target(cfg, spec).values())
    return 2 * (base_matmul_params(cfg) + lora) + attention_flops_per_token(cfg, seq_len)


def train_flops_per_token(cfg: ModelConfig, spec: LoraSpec | None, seq_len: int) -> float:
    lora = sum(lora_params_per_target(cfg, spec).values())
    matmul = 2 * (base_matmul_params(cfg) + lora)
    attn = attention_flops_per_token(cfg, seq_len)
    return (matmul + attn) + (matmul + 2 * attn) + 2 * lora


def train_flops_per_step(cfg: ModelConfig, spec: LoraSpec | None, batch: int, seq_len: int) -> float:
    return train_flops_per_token(cfg, spec, seq_len) * batch * seq_len


def measure_matmul_peak(n: int = 2048, repeats: int = 5, device=None, dtype=jnp.float32) -> float:
    """FLOP/s of the best of `repeats` timed n^3 matmuls on one device, in `dtype` with float32
    accumulation (float32: MFU's measured peak; bfloat16: an accelerator's, benchmarks/device_suite.py)."""
    device = device or jax.devices()[0]
    x = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(max(repeats, 5)):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_device: float, num_devices: int = 1) -> float:
    return flops_per_step / step_seconds / (peak_flops_per_device * num_devices)


def budget_rank(cfg: ModelConfig, targets: tuple[str, ...], budget: int, layers: tuple[int, ...] = ()) -> int:
    """The rank r >= 1 whose adapters on `targets` train the number of parameters closest to `budget`
    (parameters grow linearly in r, so the count is within half a rank step of the budget)."""
    per_rank = sum(lora_params_per_target(cfg, LoraSpec(targets=targets, rank=1, alpha=1.0, layers=layers)).values())
    return max(1, round(budget / per_rank))
