"""Decode latency of a model, the serving way: TTFT and TPOT p50/p95 over requests after warm-up.

Per request (a batch of prompts decoded together, greedy, each token observed as it is produced:
a jitted prefill, then one jitted step per token): TTFT = time to the first token; TPOT = (time of
the last token - time of the first) / (tokens - 1); percentiles over the requests. `variants` gives
the three ways the study serves an arm: the base model (no adapters), adapters unmerged (an extra
low-rank matmul per targeted projection per token — the study's +29% TPOT p95), and merged into
the base weights.
"""

from __future__ import annotations

import time

import numpy as np
from flax import nnx

from lora_jax.generate import GenerationOptions, Stepper
from lora_jax.model import Transformer, merge_lora


def variants(model: Transformer) -> dict[str, Transformer]:
    """{"base", "unmerged", "merged"} sharing the base weights of `model` (left as it is). A Llava's
    variants are Llavas (its adapters are on the decoder)."""
    _, _, frozen = nnx.split(model, nnx.LoRAParam, ...)
    if hasattr(model, "llava_config"):
        from lora_jax.llava import Llava

        base = nnx.eval_shape(lambda: Llava(model.llava_config, None, model.options, rngs=nnx.Rngs(0)))
    else:
        base = nnx.eval_shape(lambda: Transformer(model.config, None, model.options, rngs=nnx.Rngs(0)))
    nnx.update(base, frozen)
    merged = nnx.clone(model)  # new Variables: merging must not touch `model` (merge(*split()) shares them)
    merge_lora(getattr(merged, "language", merged))
    return {"base": base, "unmerged": model, "merged": merged}


class Requests:
    """Timed decode requests of one model: random prompts of `prompt_len`, `new_tokens` new tokens."""

    def __init__(
        self, model: Transformer, batch: int, prompt_len: int, new_tokens: int, seed: int = 0, adapter_ids=None
    ):
        """adapter_ids: a bank model's adapter per row (generate.py)."""
        opts = GenerationOptions(max_new_tokens=new_tokens)
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(0, model.config.vocab_size, size=(batch, prompt_len)).astype(np.int32)
        self.mask = np.ones_like(self.tokens)
        self.pixels = None
        if hasattr(model, "llava_config"):  # a LLaVA request: one image (its placeholders open the prompt)
            cfg = model.llava_config
            n = cfg.tokens_per_image
            self.tokens = np.concatenate([np.full((batch, n), cfg.image_token_id, np.int32), self.tokens], axis=1)
            self.mask = np.ones_like(self.tokens)
            shape = (batch, 1, cfg.vision.image_size, cfg.vision.image_size, cfg.vision.num_channels)
            self.pixels = rng.normal(size=shape).astype(np.float32)
        self.stepper = Stepper(model, opts, batch, self.tokens.shape[1], adapter_ids=adapter_ids)
        self.new_tokens = new_tokens

    def request(self) -> tuple[float, float]:
        """(TTFT, TPOT) of one request, seconds."""
        start = time.perf_counter()
        self.stepper.prefill(self.tokens, self.mask, self.pixels).block_until_ready()
        first = time.perf_counter()
        for _ in range(self.new_tokens - 1):
            self.stepper.step().block_until_ready()
        last = time.perf_counter()
        return first - start, (last - first) / max(self.new_tokens - 1, 1)


def summarize(samples: list[tuple[float, float]]) -> dict:
    ttft, tpot = np.asarray([s[0] for s in samples]), np.asarray([s[1] for s in samples])
    ms = lambda x, q: float(np.percentile(x, q) * 1e3)  # noqa: E731
    return {
        "ttft_ms_p50": ms(ttft, 50),
        "ttft_ms_p95": ms(ttft, 95),
        "tpot_ms_p50": ms(tpot, 50),
        "tpot_ms_p95": ms(tpot, 95),
        "requests": len(samples),
    }


def measure(
    model: Transformer, batch: int, prompt_len: int, new_tokens: int, requests: int, warmup: int = 2
) -> dict[str, dict]:
    """{variant: {"ttft_ms_p50", …}} for base, unmerged and merged, requests interleaved variant by
    variant (A B C A B C …) so that a host's drift hits each the same."""
    runners = {name: Requests(m, batch, prompt_len, new_tokens) for name, m in variants(model).items()}
    for _ in range(warmup):
        for r in runners.values():
            r.request()
    samples = {name: [] for name in runners}
    for _ in range(requests):
        for name, r in runners.items():
            samples[name].append(r.request())
    return {name: summarize(s) for name, s in samples.items()}
