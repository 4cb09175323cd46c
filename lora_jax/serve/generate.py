"""Batched generation with the KV cache: chunked prefill, then one token per step in a while loop.

The model is used as given: adapters unmerged (the study's serving mode), merged (`merge_lora`), or
a model without adapters (the base). Prompts are left-padded to one length (mask 0 on padding);
each row stops on a stop id (EOS, the chat template's end-of-turn token) and the loop ends as soon
as every row has stopped (`lax.while_loop`, not a fixed-length scan). Stop *strings* are applied to
the decoded text by `complete` (token boundaries rarely align with them).

Memory: the cache holds k/v for prompt + new tokens (in the compute dtype unless `cache_dtype`
says otherwise). A prefill in chunks of `prefill_chunk` tokens bounds the activations and, with a
memory-bounded attention (`attention_impl="chunked"`), the attention scores too, so a 32K-token
prompt needs little beyond the cache itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax.errors import ConfigError
from lora_jax.lora.bank import AdapterBank, check_adapter_ids
from lora_jax.model.transformer import CACHE_AXES, PER_LAYER_CACHE_AXES, Transformer
from lora_jax.serve.layer_arrays import split_layers
from lora_jax.sharding import constrain, partition_spec, under_mesh

CACHE_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    stop_ids: tuple[int, ...] = ()  # a row stops after emitting one of these (it is returned)
    prefill_chunk: int = 0  # 0 = the whole prompt in one call
    cache_dtype: str | None = None  # "bfloat16" | "float32"; None = the model's compute dtype

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(
                f"sampling needs temperature >= 0, top_k >= 0, 0 < top_p <= 1 "
                f"(got {self.temperature}, {self.top_k}, {self.top_p})"
            )
        if self.prefill_chunk < 0:
            raise ConfigError(f"prefill_chunk={self.prefill_chunk} must be >= 0")


def check_request(model: Transformer, prompt_len: int, opts: GenerationOptions) -> None:
    """Clear errors for requests the cache or the model's context cannot hold."""
    limit = model.config.max_position_embeddings
    if prompt_len < 1:
        raise ConfigError("empty prompt: every row needs at least one prompt token")
    if prompt_len > limit:
        raise ConfigError(f"prompt of {prompt_len} tokens is longer than the model's context ({limit})")
    if prompt_len + opts.max_new_tokens > limit:
        raise ConfigError(
            f"max_new_tokens={opts.max_new_tokens} after a {prompt_len}-token prompt passes the model's "
            f"context ({limit}); at most {limit - prompt_len}"
        )


def sample(logits: jax.Array, key: jax.Array, opts: GenerationOptions) -> jax.Array:
    """Next ids [batch] from float32 logits [batch, vocab]: argmax at temperature 0, else top-k / top-p."""
    if opts.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / opts.temperature
    if opts.top_k:
        kth = jax.lax.top_k(logits, opts.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if opts.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        sorted_logits = jnp.where(before >= opts.top_p, -jnp.inf, sorted_logits)  # the first always stays
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _last_logits(
    model: Transformer, tokens, positions, segment_ids, cache, adapter_ids=None, pixels=None, layer_params=None
):
    images = {} if pixels is None else {"pixels": pixels}  # LLaVA's prefill: the rows' images
    h, cache = model.hidden_states(
        tokens, positions, segment_ids, cache=cache, adapter_ids=adapter_ids, layer_params=layer_params, **images
    )
    return model.logits_from_hidden(h[:, -1:])[:, 0], cache


def _generate(model: Transformer, tokens, mask, key, opts: GenerationOptions, adapter_ids=None, pixels=None):
    b, t = tokens.shape
    mask = mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    dtype = CACHE_DTYPES.get(opts.cache_dtype)
    cache = init_cache(model, b, t + opts.max_new_tokens, dtype)
    cache = dict(cache, k=constrain(cache["k"], CACHE_AXES), v=constrain(cache["v"], CACHE_AXES))
    chunk = opts.prefill_chunk or t
    if t % chunk:
        raise ConfigError(f"prompt length {t} must be a multiple of prefill_chunk={chunk} (left-pad it)")
    if pixels is not None and chunk != t:
        raise ConfigError("prompts with images are prefilled whole: set the suite's prefill_chunk=0")
    if chunk == t:
        logits, cache = _last_logits(model, tokens, positions, mask, cache, adapter_ids, pixels)
    else:

        def prefill(carry, xs):
            return _last_logits(model, *xs, carry[1], adapter_ids), None

        blocks = [jnp.moveaxis(x.reshape(b, t // chunk, chunk), 1, 0) for x in (tokens, positions, mask)]
        init = (jnp.zeros((b, model.config.vocab_size), jnp.float32), cache)
        (logits, cache), _ = jax.lax.scan(prefill, init, blocks)
    stop = jnp.asarray(opts.stop_ids or (-1,), jnp.int32)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < opts.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, logits, cache, pos, done, out = carry
        tok = jnp.where(done, 0, sample(logits, jax.random.fold_in(key, i), opts))
        out = out.at[:, i].set(tok)
        done = done | jnp.isin(tok, stop)
        logits, cache = _last_logits(model, tok[:, None], pos[:, None], jnp.ones((b, 1), jnp.int32), cache, adapter_ids)
        return i + 1, logits, cache, pos + 1, done, out

    out = jnp.zeros((b, opts.max_new_tokens), jnp.int32)
    init = (jnp.zeros((), jnp.int32), logits, cache, positions[:, -1] + 1, jnp.zeros((b,), bool), out)
    steps, _, _, _, _, out = jax.lax.while_loop(cond, body, init)
    # Tokens per row: up to and including its stop id, else every step taken.
    hit = jnp.isin(out, stop) & (jnp.arange(opts.max_new_tokens)[None] < steps)
    lengths = jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1) + 1, steps)
    return out, lengths


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, opts: GenerationOptions, mesh):
    def run(state, tokens, mask, key, adapter_ids, pixels):
        return _generate(nnx.merge(graphdef, state), tokens, mask, key, opts, adapter_ids, pixels)

    if mesh is None:
        return jax.jit(run)
    # Replicated outputs: every process can read the ids (a multi-host mesh would otherwise leave
    # rows on devices another process owns).
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(under_mesh(run, mesh), out_shardings=(replicated, replicated))


def generate(
    model: Transformer, tokens, mask, opts: GenerationOptions, seed: int = 0, mesh=None, adapter_ids=None, pixels=None
):
    """tokens, mask: [batch, prompt_len] (left-padded: mask 0 on padding). Returns (ids [batch,
    max_new_tokens] (0 after a row stopped), lengths [batch]: tokens per row up to and including its
    stop id). Jitted once per (model structure, options, shapes); `mesh` pins the cache's sharding.
    A model with an AdapterBank needs `adapter_ids` [batch]: each row's adapter, -1 = the base.
    A Llava takes `pixels` [batch, images per row, H, W, 3]: each row's images, for its placeholders."""
    tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
    check_request(model, tokens.shape[1], opts)
    if bool(jnp.any(jnp.sum(mask, axis=1) == 0)):
        raise ConfigError("empty prompt: every row needs at least one prompt token")
    adapter_ids = check_row_adapters(model, adapter_ids, tokens.shape[0])
    graphdef, state = nnx.split(model)
    pixels = None if pixels is None else jnp.asarray(pixels, jnp.float32)
    out, lengths = _compiled(graphdef, opts, mesh)(state, tokens, mask, jax.random.key(seed), adapter_ids, pixels)
    return np.asarray(out), np.asarray(lengths)


@functools.lru_cache(maxsize=16)
def _compiled_argmax(graphdef, mesh):
    def run(state, tokens, adapter_ids):
        model = nnx.merge(graphdef, state)
        h, _ = model.hidden_states(tokens, adapter_ids=adapter_ids)
        return jnp.argmax(model.logits_from_hidden(h), axis=-1).astype(jnp.int32)

    if mesh is None:
        return jax.jit(run)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(under_mesh(run, mesh), out_shardings=replicated)


def teacher_forced_argmax(model: Transformer, tokens, mesh=None, adapter_ids=None) -> np.ndarray:
    """tokens [batch, time] (right-padded: causal attention keeps padding out of every real position)
    -> the model's most likely next token at every position [batch, time], each given the true
    prefix (teacher forcing). A bank model needs `adapter_ids` [batch] (-1 = the base)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    model.check_length(tokens.shape[1])
    adapter_ids = check_row_adapters(model, adapter_ids, tokens.shape[0])
    graphdef, state = nnx.split(model)
    return np.asarray(_compiled_argmax(graphdef, mesh)(state, tokens, adapter_ids))


def cache_shardings(cache: dict, mesh) -> dict:
    """k/v by CACHE_AXES (stacked) or PER_LAYER_CACHE_AXES (a tuple of per-layer arrays): kv heads over
    "tensor", rows over data x fsdp; the slot metadata by rows."""

    def sharding(name, x):
        if name in ("k", "v"):
            axes = CACHE_AXES if x.ndim == 5 else PER_LAYER_CACHE_AXES
        else:
            axes = ("act_batch", None)[: x.ndim]
        return jax.sharding.NamedSharding(mesh, partition_spec(axes, x.shape, mesh))

    return {name: jax.tree.map(lambda x, name=name: sharding(name, x), v) for name, v in cache.items()}


def check_layer_arrays(model: Transformer, layers) -> None:
    """`layers` must be this model's per-layer arrays (`split_layers`): one dict per layer, with its
    structure and shapes. A split of another variant would decode silently without (or with other)
    adapters."""
    language = getattr(model, "language", model)
    want = jax.tree.map(lambda x: x.shape[1:], language.layers.arrays())
    if len(layers) != language.config.num_layers or any(jax.tree.map(lambda x: x.shape, lay) != want for lay in layers):
        raise ValueError("layers are not this model's per-layer arrays (split_layers(model))")


def check_row_adapters(model: Transformer, adapter_ids, rows: int):
    """Per-row adapter ids for a bank model (checked: one per row, each in [-1, K)); None otherwise."""
    bank = model.lora if isinstance(model.lora, AdapterBank) else None
    if bank is None:
        if adapter_ids is not None:
            raise ConfigError("adapter_ids need a model with an adapter bank (several adapters)")
        return None
    if adapter_ids is None:
        raise ConfigError(f"a model with {bank.num_arms} adapters needs adapter_ids: one adapter (or -1) per row")
    return jnp.asarray(check_adapter_ids(adapter_ids, bank.num_arms, rows))


class Stepper:
    """Token-by-token decoding for latency measurement (the serving view: each token is observable).

    `prefill(tokens, mask)` -> first ids [batch]; then each `step()` -> next ids [batch]. Both are
    jitted once; the cache stays on device between calls. Greedy or sampled as `opts` says.

    mesh: the mesh the model's weights live on (e.g. a serving mesh, sharding.serving_mesh); the cache
    is placed on it by PER_LAYER_CACHE_AXES (kv heads over "tensor") and the activation constraints apply.

    The layers run unrolled over per-layer arrays: the weights as `split_layers` slices them (or
    `layers`, that split made by the caller: serve.latency shares one frozen base among variants),
    and one head-major KV cache per layer (`init_cache(per_layer=True)`). On XLA:CPU a layer's slice
    of the stacked weights or cache was a copy made at every step (batch-1 TPOT 13.6 -> 9.4 ms on the
    bench model). The split weights are copies: the layer weights' memory twice while a Stepper lives."""

    def __init__(
        self,
        model: Transformer,
        opts: GenerationOptions,
        batch: int,
        prompt_len: int,
        seed: int = 0,
        adapter_ids=None,
        mesh=None,
        layers=None,
    ):
        check_request(model, prompt_len, opts)
        self.adapter_ids = check_row_adapters(model, adapter_ids, batch)
        self.graphdef, self.params = nnx.split(model)
        self.layers = split_layers(model)[0] if layers is None else layers
        check_layer_arrays(model, self.layers)
        self.opts, self.key = opts, jax.random.key(seed)
        dtype = CACHE_DTYPES.get(opts.cache_dtype)
        self.cache0 = init_cache(model, batch, prompt_len + opts.max_new_tokens, dtype, per_layer=True)
        prefill_fn, step_fn = self._prefill_fn, self._step_fn
        if mesh is not None:
            self.cache0 = jax.device_put(self.cache0, cache_shardings(self.cache0, mesh))
            prefill_fn, step_fn = under_mesh(prefill_fn, mesh), under_mesh(step_fn, mesh)
        self._prefill = jax.jit(prefill_fn)
        self._step = jax.jit(step_fn, donate_argnums=(1,))

    def _prefill_fn(self, params, cache, tokens, mask, key, ids, pixels, layers):
        model = nnx.merge(self.graphdef, params)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        logits, cache = _last_logits(model, tokens, positions, mask, cache, ids, pixels, layers)
        tok = sample(logits, jax.random.fold_in(key, 0), self.opts)
        return tok, cache, positions[:, -1] + 1

    def _step_fn(self, params, cache, tok, pos, i, key, ids, layers):
        model = nnx.merge(self.graphdef, params)
        logits, cache = _last_logits(
            model, tok[:, None], pos[:, None], jnp.ones_like(tok)[:, None], cache, ids, layer_params=layers
        )
        return sample(logits, jax.random.fold_in(key, i), self.opts), cache, pos + 1

    def prefill(self, tokens, mask, pixels=None) -> jax.Array:
        """pixels: a Llava's images per row [batch, images, H, W, 3] (the prefill runs the tower)."""
        tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
        self._prefill_args = (self.params, self.cache0, tokens, mask, self.key, self.adapter_ids, pixels, self.layers)
        self.tok, self.cache, self.pos = self._prefill(*self._prefill_args)
        self.i = 1
        return self.tok

    def compiled(self) -> dict[str, jax.stages.Compiled]:
        """{"prefill", "step"}: the executables `prefill` and `step` run, lowered with the arguments of
        the last prefill and of the next step (call after `prefill`); e.g. to read their HLO."""
        step_args = (self.params, self.cache, self.tok, self.pos, self.i, self.key, self.adapter_ids, self.layers)
        return {
            "prefill": self._prefill.lower(*self._prefill_args).compile(),
            "step": self._step.lower(*step_args).compile(),
        }

    def step(self) -> jax.Array:
        self.tok, self.cache, self.pos = self._step(
            self.params, self.cache, self.tok, self.pos, self.i, self.key, self.adapter_ids, self.layers
        )
        self.i += 1
        return self.tok


def left_pad(
    prompts: Sequence[Sequence[int]], multiple: int = 1, pad_id: int = 0, max_length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts -> (tokens, mask) [batch, length], left-padded to a multiple of `multiple`
    (the longest prompt's own length when that multiple would pass max_length)."""
    longest = max(len(p) for p in prompts)
    length = -(-longest // multiple) * multiple
    if max_length is not None and length > max_length:
        length = longest
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for r, p in enumerate(prompts):
        if len(p):
            tokens[r, length - len(p) :] = p
            mask[r, length - len(p) :] = 1
    return tokens, mask


def complete(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    opts: GenerationOptions,
    decode: Callable[[list[int]], str],
    *,
    stop_strings: Sequence[str] = (),
    batch_size: int = 8,
    seed: int = 0,
    mesh=None,
    pad_multiple: int = 1,
    adapter_ids: Sequence[int] | None = None,
    pixels: Sequence | None = None,
) -> list[str]:
    """Prompt ids (e.g. the chat template's generation prompt, as training renders it) -> completions:
    the decoded text before the first stop id and before the first stop string. Prompts are padded to
    a multiple of `pad_multiple` (and of prefill_chunk) so that few prompt lengths need a compile.
    With a bank model, `adapter_ids` gives each prompt's adapter (-1 = the base); with a Llava,
    `pixels` each prompt's images ([images, H, W, 3], as many as its placeholders)."""
    texts = []
    multiple = math.lcm(max(opts.prefill_chunk, 1), max(pad_multiple, 1))
    room = model.config.max_position_embeddings - opts.max_new_tokens
    for start in range(0, len(prompts), batch_size):
        group = list(prompts[start : start + batch_size])
        fill = batch_size - len(group)
        group += [group[-1]] * fill  # one compiled shape for every batch
        ids = None
        if adapter_ids is not None:
            ids = list(adapter_ids[start : start + batch_size])
            ids += [ids[-1]] * fill
        tokens, mask = left_pad(group, multiple, max_length=room)
        images = None
        if pixels is not None:
            images = list(pixels[start : start + batch_size])
            images += [images[-1]] * fill
            images = np.stack(images)  # [batch, images per row, H, W, 3]
        out, lengths = generate(model, tokens, mask, opts, seed=seed + start, mesh=mesh, adapter_ids=ids, pixels=images)
        for row in range(min(batch_size, len(prompts) - start)):
            ids = [int(i) for i in out[row, : lengths[row]]]
            if ids and ids[-1] in opts.stop_ids:
                ids = ids[:-1]
            text = decode(ids)
            cuts = [text.find(s) for s in stop_strings if s and s in text]
            texts.append(text[: min(cuts)] if cuts else text)
    return texts


def init_cache(model: Transformer, batch: int, max_len: int, dtype=None, per_layer: bool = False) -> dict:
    """An empty cache: k/v [layers, batch, max_len, kv_heads, head_dim]; slot positions/segments [batch, max_len].

    Segment 0 marks an empty slot, so it is never attended to. per_layer: k/v as one array per layer,
    head-major [batch, kv_heads, max_len, head_dim] (decoding with `split_layers`: a layer then reads its cache
    in place, where a slice of the stack is a copy).
    """
    cfg = model.config
    model.check_length(max_len)
    dtype = dtype or model.options.compute_dtype
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    if per_layer:
        layer_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        k, v = (tuple(jnp.zeros(layer_shape, dtype) for _ in range(cfg.num_layers)) for _ in "kv")
    else:
        k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)  # two buffers: a step may donate both
    return {
        "k": k,
        "v": v,
        "positions": jnp.zeros((batch, max_len), jnp.int32),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }
