"""Decode latency of a model, the serving way: TTFT and TPOT p50/p95 over requests after warm-up.

Per request (a batch of prompts decoded together, greedy, each token observed as it is produced:
a jitted prefill, then one jitted step per token): TTFT = time to the first token; TPOT = (time of
the last token - time of the first) / (tokens - 1); percentiles over the requests. `variants` gives
the three ways the study serves an arm: the base model (no adapters), adapters unmerged (an extra
low-rank matmul per targeted projection per token — the study's +29% TPOT p95), and merged into
the base weights.

Where: on a serving mesh (`eval.latency.mesh`, rule in sharding.py), not on the training mesh. The
model's weights are copied onto it (`sharding.resharded`), so a decode token never communicates over
the whole training mesh (gathering FSDP shards of the kernels, or all-reducing partial activations
over every device, as XLA chose on CPU): "auto" decodes on one device when what `serving_bytes` counts
(the variants' weights, the per-layer slices they decode from, their KV caches) fits it, else tensor-parallel over the kv heads; "single" and "tensor" force either. The
result records the device kind, the serving mesh's device count and its axis sizes.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lora_jax.model.transformer import Transformer, merge_lora
from lora_jax.serve.generate import GenerationOptions, Stepper
from lora_jax.serve.layer_arrays import split_layers
from lora_jax.sharding import mesh_sizes, resharded, serving_mesh


def variants(model: Transformer) -> dict[str, Transformer]:
    """{"base", "unmerged", "merged"} sharing the base weights of `model` (left as it is). A Llava's
    variants are Llavas (its adapters are on the decoder)."""
    _, _, frozen = nnx.split(model, nnx.LoRAParam, ...)
    if hasattr(model, "llava_config"):
        from lora_jax.model.llava import Llava

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
        self,
        model: Transformer,
        batch: int,
        prompt_len: int,
        new_tokens: int,
        seed: int = 0,
        adapter_ids=None,
        mesh: Mesh | None = None,
        layers=None,
    ):
        """adapter_ids: a bank model's adapter per row (generate.py). mesh: decode there (e.g.
        `sharding.serving_mesh`): the weights are resharded onto it (no copy when already there);
        None = where the model's arrays are. layers: the model's per-layer arrays (`split_layers`),
        None = split here."""
        opts = GenerationOptions(max_new_tokens=new_tokens)
        if mesh is not None:
            model = resharded(model, mesh)
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
        self.stepper = Stepper(
            model, opts, batch, self.tokens.shape[1], adapter_ids=adapter_ids, mesh=mesh, layers=layers
        )
        self.new_tokens = new_tokens

    def generated(self) -> np.ndarray:
        """The ids one request produces, [batch, new_tokens] (what `request` times, untimed)."""
        out = [self.stepper.prefill(self.tokens, self.mask, self.pixels)]
        for _ in range(self.new_tokens - 1):
            out.append(self.stepper.step())
        return np.stack([np.asarray(t) for t in out], axis=1)

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


def _nbytes(x) -> int:
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def serving_bytes(model: Transformer, batch: int, max_len: int) -> int:
    """Device bytes `measure` holds at once: every weight, the merged variant's copies of the adapted
    kernels, the per-layer slices the Steppers decode from (`split_layers`: every decoder-layer array
    once, shared by the variants, and the merged kernels' own), and two KV caches per variant (k and
    v, layers x batch x max_len x kv_heads x head_dim: the empty one each prefill starts from, and
    the live one). Shapes only: `model` may be abstract (nnx.eval_shape)."""
    language = getattr(model, "language", model)
    targets = language.lora.targets if language.lora else ()
    merged = sum(_nbytes(getattr(language.layers, t).kernel.get_value()) for t in targets)
    layers = sum(_nbytes(a) for a in jax.tree.leaves(language.layers.arrays()))
    cfg = model.config
    itemsize = np.dtype(model.options.compute_dtype).itemsize
    cache = 2 * cfg.num_layers * batch * max_len * cfg.num_kv_heads * cfg.head_dim * itemsize
    return sum(_nbytes(a) for a in jax.tree.leaves(nnx.state(model))) + layers + 2 * merged + 6 * cache


def prepare(model: Transformer, batch: int, prompt_len: int, new_tokens: int, mesh: str = "auto"):
    """(serving Mesh, {"base"|"unmerged"|"merged": Requests}): `model` copied onto the serving mesh that
    `mesh` ("auto" | "single" | "tensor" | "tensor:N", see sharding.py) picks, and its variants there.
    These are the executables `measure` times."""
    images = model.llava_config.tokens_per_image if hasattr(model, "llava_config") else 0  # Requests' placeholders
    need = serving_bytes(model, batch, images + prompt_len + new_tokens)
    serve = serving_mesh(mesh, model.config.num_kv_heads, need)
    served = variants(resharded(model, serve))
    splits = split_layers(*served.values())  # one set of frozen slices for the three
    return serve, {
        name: Requests(m, batch, prompt_len, new_tokens, mesh=serve, layers=layers)
        for (name, m), layers in zip(served.items(), splits)
    }


def measure(
    model: Transformer,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    requests: int,
    warmup: int = 2,
    mesh: str = "auto",
) -> dict:
    """{"variants": {variant: {"ttft_ms_p50", …}}, "device", "device_count", "mesh"} for base, unmerged
    and merged on the serving mesh `mesh` picks (see `prepare`), requests interleaved variant by
    variant (A B C A B C …) so that a host's drift hits each the same. device: the device kind;
    device_count: devices in the serving mesh; mesh: its {"data", "fsdp", "tensor"} sizes."""
    serve, runners = prepare(model, batch, prompt_len, new_tokens, mesh)
    for _ in range(warmup):
        for r in runners.values():
            r.request()
    samples = {name: [] for name in runners}
    for _ in range(requests):
        for name, r in runners.items():
            samples[name].append(r.request())
    return {
        "variants": {name: summarize(s) for name, s in samples.items()},
        "device": str(serve.devices.flat[0].device_kind),
        "device_count": int(serve.devices.size),
        "mesh": mesh_sizes(serve),
    }
