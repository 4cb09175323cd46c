"""Decoder LMs (Llama 3, Qwen2/2.5, Mistral, Qwen3, Gemma 3) in Flax NNX with per-submodule LoRA.

The families differ only in switches of `ModelConfig`: q/k norms, Gemma's (1 + w) norms before and
after attention and the MLP, the MLP activation, scaled embeddings, the attention scale, per-layer
sliding windows with a RoPE of their own, and final logit soft-capping.

Parameters of all layers are stacked on a leading `layers` axis and the layers run under
`jax.lax.scan`, so the compiled program does not grow with depth. NNX modules hold the variables
(frozen base = `nnx.Param`, adapters = `nnx.LoRAParam`, each with `logical_axes` metadata for
sharding); the math is plain functions of arrays.

Fused layouts keep heads whole under a tensor-parallel split of the kv-head axis:
  qkv    [layers, embed, kv_heads, q_per_kv + 2, head_dim]   (slots: q_0..q_{g-1}, k, v)
  o_proj [layers, kv_heads, q_per_kv, head_dim, embed]
  fc1    [layers, embed, 2, mlp]                               (gate, up)
  fc2    [layers, mlp, embed]
  lm_head [vocab, embed]  (untied; as HF stores it: a decode step reads it contracting its minor axis)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax.errors import ConfigError
from lora_jax.lora.bank import AdapterBank, check_adapter_ids, grouped_delta, row_delta
from lora_jax.lora.delta import delta_weight, lora_a_bound, lora_delta, lora_dropout, lora_matmul
from lora_jax.lora.spec import LoraSpec
from lora_jax.model import attention as attention_lib
from lora_jax.model import init as initial
from lora_jax.model.config import ModelConfig
from lora_jax.model.rope import apply_rope, inverse_frequencies, rope_angles
from lora_jax.sharding import constrain

RESIDUAL = ("act_batch", "act_len", "act_embed")
CACHE_AXES = (None, "act_batch", None, "act_kv_heads", None)  # KV cache [layers, batch, slots, kv_heads, head_dim]
PER_LAYER_CACHE_AXES = ("act_batch", "act_kv_heads", None, None)  # one layer's cache [batch, kv_heads, slots, head_dim]

REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How the model runs (not what it is): dtypes, attention kernel, layer scan, remat."""

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    attention_impl: str = "xla"
    scan_layers: bool = True
    remat: str = "none"
    # float32 without dropout: base + adapter as one matmul with the merged weight (custom VJP, faster
    # on CPU). False = always the plain x·W + s·(x·A)·B (the reference the fused path is tested against).
    fused_lora_matmul: bool = True

    def __post_init__(self):
        attention_lib.get_attention_impl(self.attention_impl)  # validates the name
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={self.remat!r} is unknown; valid: {', '.join(REMAT_POLICIES)}")


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple, tuple]]:
    """For each LoRA target: (in_dims, out_dims, in_axes, out_axes) of its kernel, per layer."""
    e, k, g, d, m = cfg.hidden_size, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.intermediate_size
    return {
        "qkv": ((e,), (k, g + 2, d), ("embed",), ("kv_heads", "qkv_slot", "head_dim")),
        "o_proj": ((k, g, d), (e,), ("kv_heads", "q_slot", "head_dim"), ("embed",)),
        "fc1": ((e,), (2, m), ("embed",), ("gate_up", "mlp")),
        "fc2": ((m,), (e,), ("mlp",), ("embed",)),
    }


class Projection(nnx.Module):
    """One frozen kernel stacked over layers, with an optional bias and an optional LoRA adapter."""

    def __init__(
        self,
        num_layers,
        in_dims,
        out_dims,
        in_axes,
        out_axes,
        *,
        bias,
        lora_rank,
        param_dtype,
        rngs,
        lora_slots=0,
        init_std=0.02,
    ):
        """lora_slots > 0: a bank's adapters, [layers, slots, ...] (see lora/bank.py)."""
        shape = (num_layers, *in_dims, *out_dims)
        # Base and adapter draws come from one key per projection, so the base weights do not
        # depend on which targets carry adapters (every arm starts from the same base).
        key = rngs.params()
        init = initial.normal(jax.random.fold_in(key, 0), shape, param_dtype, init_std)
        self.kernel = nnx.Param(init, logical_axes=("layers", *in_axes, *out_axes))
        zeros = initial.constant(0.0, (num_layers, *out_dims), param_dtype)
        self.bias = nnx.Param(zeros, logical_axes=("layers", *out_axes)) if bias else None
        # As PEFT: A ~ kaiming-uniform(a=sqrt(5)), B = 0 (step 0 equals the base model).
        self.lora_a = self.lora_b = None
        if lora_rank:
            slots = (lora_slots,) if lora_slots else ()
            slot_axes = ("adapters",) if lora_slots else ()
            a_shape = (num_layers, *slots, *in_dims, lora_rank)
            a = initial.uniform(jax.random.fold_in(key, 1), a_shape, lora_a_bound(a_shape))
            b = initial.constant(0.0, (num_layers, *slots, lora_rank, *out_dims), jnp.float32)
            self.lora_a = nnx.data(nnx.LoRAParam(a, logical_axes=("layers", *slot_axes, *in_axes, "lora_rank")))
            self.lora_b = nnx.data(nnx.LoRAParam(b, logical_axes=("layers", *slot_axes, "lora_rank", *out_axes)))

    def arrays(self) -> dict[str, jax.Array]:
        out = {"kernel": self.kernel.get_value()}
        for name in ("bias", "lora_a", "lora_b"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).get_value()
        return out


class DecoderLayers(nnx.Module):
    """All decoder layers' parameters, stacked."""

    def __init__(self, cfg: ModelConfig, lora: LoraSpec | AdapterBank | None, param_dtype, rngs: nnx.Rngs):
        n = cfg.num_layers
        unit = norm_identity(cfg)
        ones = initial.constant(unit, (n, cfg.hidden_size), param_dtype)
        self.attn_norm = nnx.Param(ones, logical_axes=("layers", "norm"))
        self.mlp_norm = nnx.Param(ones, logical_axes=("layers", "norm"))
        # Gemma 3: the attention output and the MLP output are normed too, before the residual add.
        self.post_attn_norm = self.post_mlp_norm = None
        if cfg.gemma_norms:
            self.post_attn_norm = nnx.data(nnx.Param(ones, logical_axes=("layers", "norm")))
            self.post_mlp_norm = nnx.data(nnx.Param(ones, logical_axes=("layers", "norm")))
        # Qwen3, Gemma 3: RMSNorm over head_dim of every query and key head, before RoPE.
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            head = initial.constant(unit, (n, cfg.head_dim), param_dtype)
            self.q_norm = nnx.data(nnx.Param(head, logical_axes=("layers", "head_dim")))
            self.k_norm = nnx.data(nnx.Param(head, logical_axes=("layers", "head_dim")))
        for name, (in_dims, out_dims, in_axes, out_axes) in target_shapes(cfg).items():
            slots = 0
            if isinstance(lora, AdapterBank):
                rank, slots = lora.rank(name), len(lora.members(name))
            else:
                rank = lora.rank_for(name) if lora and name in lora.targets else 0
            bias = cfg.qkv_bias and name == "qkv"
            proj = Projection(
                n,
                in_dims,
                out_dims,
                in_axes,
                out_axes,
                bias=bias,
                lora_rank=rank,
                param_dtype=param_dtype,
                rngs=rngs,
                lora_slots=slots,
                init_std=cfg.initializer_range,
            )
            setattr(self, name, proj)

    def arrays(self) -> dict[str, Any]:
        norms = {n: getattr(self, n).get_value() for n in NORMS if getattr(self, n) is not None}
        return {**norms, **{name: getattr(self, name).arrays() for name in ("qkv", "o_proj", "fc1", "fc2")}}


NORMS = ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm")


def norm_identity(cfg: ModelConfig) -> float:
    """The norm weight that scales by 1: Gemma's norms multiply by (1 + w), the others by w."""
    return 0.0 if cfg.gemma_norms else 1.0


def rms_norm(x, weight, eps, plus_one: bool = False):
    """As transformers: statistics in float32. Llama/Qwen cast the normalised value back before the
    weight; Gemma multiplies by (1 + w) in float32 and casts after."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def softcap(logits, cap: float | None):
    """cap * tanh(logits / cap) (Gemma's final logit soft-capping); logits unchanged when cap is None."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def mlp_activation(name: str):
    # transformers' gelu_pytorch_tanh is the tanh approximation of GELU.
    return jax.nn.silu if name == "silu" else functools.partial(jax.nn.gelu, approximate=True)


class Transformer(nnx.Module):
    """Decoder-only LM. `__call__` gives float32 logits; `hidden_states` the final normed activations."""

    def __init__(
        self, cfg: ModelConfig, lora: LoraSpec | AdapterBank | None = None, options=RuntimeOptions(), *, rngs: nnx.Rngs
    ):
        """lora: one adapter (LoraSpec), K adapters over this one base (AdapterBank), or none."""
        self.config = cfg
        self.lora = lora
        self.options = options
        self.merged = False  # True after merge_lora: adapters are folded into the kernels
        if isinstance(lora, AdapterBank):
            lora.check_layers(cfg.num_layers)
        elif lora is not None and lora.layers and lora.layers[-1] >= cfg.num_layers:
            raise ConfigError(f"lora.layers={lora.layers}: the model has layers 0..{cfg.num_layers - 1}")
        pdt = options.param_dtype
        emb = initial.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt, cfg.initializer_range)
        self.embed = nnx.Param(emb, logical_axes=("vocab", "embed"))
        self.layers = DecoderLayers(cfg, lora, pdt, rngs)
        final = initial.constant(norm_identity(cfg), (cfg.hidden_size,), pdt)
        self.final_norm = nnx.Param(final, logical_axes=("norm",))
        # [vocab, embed] like the embedding (and HF's lm_head.weight): a decode step's logits [rows, vocab]
        # then read it contracting its minor axis, ~1.9x faster at 8 rows on XLA:CPU than [embed, vocab].
        self.lm_head = None  # tied: the embedding itself
        if not cfg.tie_word_embeddings:
            shape, std = (cfg.hidden_size, cfg.vocab_size), cfg.initializer_range
            head = initial.normal(rngs.params(), shape, pdt, std, transpose=True)  # the values it always had
            self.lm_head = nnx.data(nnx.Param(head, logical_axes=("vocab", "embed")))

    # -- pieces -----------------------------------------------------------------------------

    def lm_head_weight(self) -> jax.Array:
        """[vocab, embed], in the parameter dtype: the head (the embedding when tied), as stored. Every
        logit matmul contracts its minor axis; a transposed copy would be materialised under the loss's
        scan each step (35 ms of a 2.1 s bench step on CPU, and the whole head's memory again on a GPU)."""
        return (self.embed if self.lm_head is None else self.lm_head).get_value()

    @property
    def logit_softcap(self) -> float | None:
        """Gemma's final soft-capping of the logits (None: none); the loss applies it too."""
        return self.config.final_logit_softcap

    def logits_from_hidden(self, hidden_btd: jax.Array) -> jax.Array:
        """float32 logits [batch, time, vocab]. For training use `loss.chunked_cross_entropy` instead."""
        w = self.lm_head_weight().astype(hidden_btd.dtype)
        logits = jnp.einsum("btd,vd->btv", hidden_btd, w, preferred_element_type=jnp.float32)
        return softcap(logits, self.logit_softcap)

    def check_length(self, length: int) -> None:
        if length > self.config.max_position_embeddings:
            raise ConfigError(
                f"sequence length {length} exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )

    # -- forward ----------------------------------------------------------------------------

    def hidden_states(
        self,
        tokens,
        positions=None,
        segment_ids=None,
        *,
        cache=None,
        dropout_key=None,
        adapter_ids=None,
        embeds=None,
        layer_params=None,
    ):
        """tokens/positions/segment_ids: [batch, time] int32 -> (hidden [batch, time, embed], new cache).

        Without a cache the keys are the tokens themselves (training, scoring). With a cache (see
        `serve.generate.init_cache`) the tokens' k/v are written at `cache["index"]` and queries attend to
        every filled slot. With an AdapterBank: `adapter_ids` [batch] picks each row's adapter (-1 =
        the base); without them the rows are grouped, row b*K + k for arm k (see lora/bank.py).
        `embeds` [batch, time, embed]: the input embeddings to use instead of the tokens' (LLaVA: image
        features in the image placeholders' places, llava.py).
        `layer_params`: one dict of arrays per layer (`serve.layer_arrays`), the layers then unrolled
        and the cache may be per layer: the Stepper's decoding (on XLA:CPU a slice of the stacks is a copy).
        """
        cfg, opts = self.config, self.options
        b, t = tokens.shape
        bank = self.lora if isinstance(self.lora, AdapterBank) else None
        if adapter_ids is not None and bank is None:
            raise ConfigError("adapter_ids need a model with an adapter bank (several adapters)")
        if bank is not None and adapter_ids is None and b % bank.num_arms:
            raise ConfigError(f"{b} rows cannot be grouped over the bank's {bank.num_arms} adapters")
        if isinstance(adapter_ids, (list, tuple, np.ndarray)):  # concrete: checked here (traced: by the caller)
            adapter_ids = jnp.asarray(check_adapter_ids(adapter_ids, bank.num_arms, b))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        per_layer_cache = cache is not None and isinstance(cache["k"], (tuple, list))
        if per_layer_cache and layer_params is None:
            raise ValueError("a cache of one array per layer (init_cache(per_layer=True)) needs layer_params")
        counts = {"layer_params": layer_params}
        if per_layer_cache:
            counts.update({"the per-layer cache's k": cache["k"], "the per-layer cache's v": cache["v"]})
        for name, seq in counts.items():
            if seq is not None and len(seq) != cfg.num_layers:
                raise ValueError(f"{name} holds {len(seq)} layers; the model has {cfg.num_layers}")
        self.check_length(t if cache is None else cache["positions"].shape[1])
        cdt = opts.compute_dtype
        h = self.embed_tokens(tokens) if embeds is None else embeds
        h = constrain(h.astype(cdt), RESIDUAL)
        cos, sin = rope_angles(positions, inverse_frequencies(cfg.rope, cfg.head_dim))
        local_rope = None
        if cfg.rope_local is not None:  # Gemma 3: the sliding layers rotate with their own base
            local_rope = rope_angles(positions, inverse_frequencies(cfg.rope_local, cfg.head_dim))
        if cache is not None:
            # Slots written by this call take the tokens' positions and segments; then all layers
            # read the same slot metadata.
            idx = cache["index"]
            cache = dict(
                cache,
                positions=jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, idx, axis=1),
                segment_ids=jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, idx, axis=1),
            )
        ctx = _LayerContext(
            cfg=cfg,
            lora=None if self.merged else self.lora,
            attn=attention_lib.get_attention_impl(opts.attention_impl),
            compute_dtype=cdt,
            cos=cos,
            sin=sin,
            positions=positions,
            segment_ids=segment_ids,
            cache=cache,
            dropout_key=dropout_key,
            fused_lora_matmul=opts.fused_lora_matmul,
            adapter_ids=adapter_ids,
            local_rope=local_rope,
        )
        xs = {"layer": jnp.arange(cfg.num_layers, dtype=jnp.int32)}
        if len(cfg.window_kinds) > 1:  # layers of several window kinds: each picks its own (make_layer_fn)
            xs["kind"] = jnp.asarray([cfg.window_kind_of_layer(i) for i in range(cfg.num_layers)], jnp.int32)
        # With a cache the k/v (stacked, or per layer) are carried through the layers, each writing only
        # its new tokens in place; as scanned outputs every step rewrote the whole cache.
        carry = h if cache is None else (h, cache["k"], cache["v"])

        body = make_layer_fn(ctx)
        if opts.remat == "full":
            body = jax.checkpoint(body)
        elif opts.remat == "dots":
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

        if layer_params is None and opts.scan_layers:
            carry, _ = jax.lax.scan(body, carry, dict(xs, params=self.layers.arrays()))
        else:  # unrolled, over per-layer arrays (decoding: serve/layer_arrays.py) or slices of the stacks
            stacked = self.layers.arrays() if layer_params is None else None
            ks, vs = (list(cache["k"]), list(cache["v"])) if per_layer_cache else (None, None)
            for i in range(cfg.num_layers):
                p = layer_params[i] if stacked is None else jax.tree.map(lambda x, i=i: x[i], stacked)
                xs_i = {"layer": i, "params": p}  # Python ints: the layer's scale and window are static
                if "kind" in xs:  # the layer's own window branch only, no lax.switch
                    xs_i["kind"] = cfg.window_kind_of_layer(i)
                if per_layer_cache:  # layer i reads and writes its own cache arrays: no slice of a stack
                    (h, ks[i], vs[i]), _ = body((h, ks[i], vs[i]), xs_i)
                else:
                    carry, _ = body(carry, xs_i)
            if per_layer_cache:
                carry = (h, tuple(ks), tuple(vs))
        new_cache = None
        if cache is not None:
            h, k_all, v_all = carry
            new_cache = dict(cache, k=k_all, v=v_all, index=cache["index"] + t)
        else:
            h = carry
        h = rms_norm(h, self.final_norm.get_value(), cfg.rms_norm_eps, cfg.gemma_norms)
        return h, new_cache

    def embed_tokens(self, tokens) -> jax.Array:
        """[batch, time] -> the input embeddings [batch, time, embed] in the parameter dtype (Gemma:
        times sqrt(hidden), that factor rounded to the parameter dtype first, as transformers does)."""
        table = self.embed.get_value()
        h = jnp.take(table, tokens, axis=0)
        if self.config.embed_scale:
            h = h * jnp.asarray(self.config.hidden_size**0.5, jnp.float32).astype(table.dtype)
        return h

    def __call__(self, tokens, positions=None, segment_ids=None, *, dropout_key=None):
        """float32 logits [batch, time, vocab] (no cache)."""
        h, _ = self.hidden_states(tokens, positions, segment_ids, dropout_key=dropout_key)
        return self.logits_from_hidden(h)


@dataclasses.dataclass
class _LayerContext:
    cfg: ModelConfig
    lora: LoraSpec | None
    attn: Any
    compute_dtype: Any
    cos: jax.Array
    sin: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    cache: dict | None
    dropout_key: jax.Array | None
    fused_lora_matmul: bool = True
    adapter_ids: jax.Array | None = None  # an AdapterBank's per-row adapter (None = grouped rows)
    local_rope: tuple[jax.Array, jax.Array] | None = None  # (cos, sin) of the sliding layers (Gemma 3)


def _fusing_pays(x, w, n_in: int) -> bool:
    """Forming W + A·sB costs in·out·r; the plain adapter path costs tokens·(in + out)·r. Decoding (a few
    tokens a step) keeps the plain path, so an unmerged adapter never rewrites the weight per token."""
    tokens = math.prod(x.shape[: x.ndim - n_in])
    n_in_size = math.prod(w.shape[:n_in])
    return tokens * (n_in_size + w.size // n_in_size) >= w.size


def _layer_scale(spec: LoraSpec, target: str, layer):
    """The adapter's scale in this layer: 0 outside lora.layers (the adapter weights of every layer
    stay stacked for the scan; an excluded layer's adapter gets no gradient and adds nothing)."""
    scale = spec.scale_for(target)
    if not spec.layers:
        return scale
    return scale * jnp.isin(jnp.asarray(layer), jnp.asarray(spec.layers)).astype(jnp.float32)


def _bank_delta(x, p, target: str, ctx: _LayerContext, layer):
    """The bank's adapter deltas for `target` (see lora/bank.py): grouped rows, or per-row ids."""
    bank = ctx.lora
    scale = jnp.asarray(bank.scale_table(target, ctx.cfg.num_layers))[layer]  # [slots]
    x = lora_dropout(x, bank.dropout, ctx.dropout_key, layer, target)
    if ctx.adapter_ids is None:
        return grouped_delta(x, p["lora_a"], p["lora_b"], scale, bank.members(target), bank.num_arms)
    arm = jnp.maximum(ctx.adapter_ids, 0)
    slots = jnp.where(ctx.adapter_ids >= 0, jnp.asarray(bank.slot_table(target))[arm], -1)
    return row_delta(x, p["lora_a"], p["lora_b"], scale, slots)


def _project(x, p, target: str, n_in: int, ctx: _LayerContext, layer):
    """Frozen kernel (+ bias) + LoRA delta. x: [..., *in_dims] -> [..., *out_dims] in compute dtype."""
    cdt = ctx.compute_dtype
    w = p["kernel"].astype(cdt)
    if isinstance(ctx.lora, AdapterBank):
        y = jnp.tensordot(x, w, axes=n_in, preferred_element_type=jnp.float32).astype(cdt)
        if "lora_a" in p:
            y = y + _bank_delta(x, p, target, ctx, layer).astype(cdt)
        return y + p["bias"].astype(cdt) if "bias" in p else y
    has_lora = ctx.lora is not None and "lora_a" in p
    no_dropout = ctx.lora is not None and (ctx.lora.dropout == 0.0 or ctx.dropout_key is None)
    scale = _layer_scale(ctx.lora, target, layer) if has_lora else None
    if has_lora and no_dropout and cdt == jnp.float32 and ctx.fused_lora_matmul and _fusing_pays(x, w, n_in):
        # Base + adapter as one matmul with the merged weight (custom VJP, see lora/delta.py). Only in
        # float32: a bfloat16 merged weight would round small adapter deltas away.
        b = p["lora_b"] * scale
        y = lora_matmul(x, w, p["lora_a"].astype(cdt), b.astype(cdt), n_in)
    else:
        y = jnp.tensordot(x, w, axes=n_in, preferred_element_type=jnp.float32).astype(cdt)
        if has_lora:
            x_in = lora_dropout(x, ctx.lora.dropout, ctx.dropout_key, layer, target)
            delta = lambda: lora_delta(x_in, p["lora_a"], p["lora_b"], scale).astype(y.dtype)  # noqa: E731
            if ctx.lora.layers:  # a layer outside lora.layers skips the adapter's matmuls (decode latency)
                on = jnp.isin(jnp.asarray(layer), jnp.asarray(ctx.lora.layers))
                y = y + jax.lax.cond(on, delta, lambda: jnp.zeros_like(y))
            else:
                y = y + delta()
    if "bias" in p:
        y = y + p["bias"].astype(cdt)
    return y


def _attend(ctx: _LayerContext, kind, q, keys, values, kv_pos, kv_seg):
    """Attention with the layer's window. Layers of one window kind share a branch compiled with that
    window as a Python int, so a kernel can leave out the key blocks outside it (a traced window
    could only mask them); with several kinds the scan's per-layer `kind` picks the branch, and an
    unrolled layer's `kind` (a Python int) picks it statically."""
    cfg = ctx.cfg

    def branch(window):
        def run(q, keys, values):
            return ctx.attn(
                q,
                keys,
                values,
                ctx.positions,
                kv_pos,
                ctx.segment_ids,
                kv_seg,
                window=window,
                scale=cfg.attention_scale,
            )

        return run

    branches = [branch(w) for w in cfg.window_kinds]
    if len(branches) == 1 or isinstance(kind, int):  # one kind, or the layers unrolled: a static pick
        return branches[0 if len(branches) == 1 else kind](q, keys, values)
    return jax.lax.switch(kind, branches, q, keys, values)


def _write_head_major(cache, new, at):
    """new [batch, time, kv_heads, head_dim] into a head-major layer cache at `at`. Head-major, the
    attention's score and value matmuls read the cache as stored; [slots, kv_heads] order made XLA
    transpose the layer's whole cache twice per decode step."""
    new = jnp.swapaxes(new, 1, 2).astype(cache.dtype)
    return constrain(jax.lax.dynamic_update_slice(cache, new, at), PER_LAYER_CACHE_AXES)


def make_layer_fn(ctx: _LayerContext):
    """The scan body: one decoder layer, (carry, per-layer xs) -> (carry, nothing). carry is h, or with
    a KV cache (h, k, v): k/v the stacked [layers, batch, slots, kv_heads, head_dim] caches, or (layers
    unrolled over `layer_params`) this layer's own head-major [batch, kv_heads, slots, head_dim] ones.
    xs["kind"], the layer's window kind, is traced under the scan and a Python int when unrolled."""
    cfg = ctx.cfg
    g = cfg.q_per_kv
    gemma, eps = cfg.gemma_norms, cfg.rms_norm_eps
    act_fn = mlp_activation(cfg.hidden_act)

    def layer(carry, xs):
        h, k_all, v_all = carry if ctx.cache is not None else (carry, None, None)
        p, idx = xs["params"], xs["layer"]
        kind = xs.get("kind")
        x = rms_norm(h, p["attn_norm"], eps, gemma)
        qkv = _project(x, p["qkv"], "qkv", 1, ctx, idx)  # [b, t, kv, g+2, d]
        qkv = constrain(qkv, ("act_batch", "act_len", "act_kv_heads", None, None))
        q, k, v = qkv[..., :g, :], qkv[..., g, :], qkv[..., g + 1, :]
        if cfg.qk_norm:
            q, k = rms_norm(q, p["q_norm"], eps, gemma), rms_norm(k, p["k_norm"], eps, gemma)
        cos, sin = ctx.cos, ctx.sin
        if ctx.local_rope is not None:
            flags = [w is not None for w in cfg.window_kinds]
            if kind is None or isinstance(kind, int):  # the layer's window kind is known: a static pick
                cos, sin = ctx.local_rope if flags[kind or 0] else (cos, sin)
            else:
                local = jnp.asarray(flags)[kind]
                cos, sin = (jnp.where(local, lo, gl) for lo, gl in zip(ctx.local_rope, (cos, sin)))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx.cache is None:
            kv_pos, kv_seg, keys, values = ctx.positions, ctx.segment_ids, k, v
        else:
            if k_all.ndim == 4:  # this layer's own cache arrays, head-major [batch, kv_heads, slots, head_dim]
                at = (0, 0, ctx.cache["index"], 0)
                k_all = _write_head_major(k_all, k, at)
                v_all = _write_head_major(v_all, v, at)
                keys, values = (jnp.swapaxes(x, 1, 2).astype(q.dtype) for x in (k_all, v_all))
            else:  # the stacked caches [layers, ...]: this layer's slots of this call's tokens
                at = (idx, 0, ctx.cache["index"], 0, 0)
                k_all = constrain(jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], at), CACHE_AXES)
                v_all = constrain(jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], at), CACHE_AXES)
                keys = jax.lax.dynamic_index_in_dim(k_all, idx, keepdims=False).astype(q.dtype)
                values = jax.lax.dynamic_index_in_dim(v_all, idx, keepdims=False).astype(q.dtype)
            kv_pos, kv_seg = ctx.cache["positions"], ctx.cache["segment_ids"]
        attn = _attend(ctx, kind, q, keys, values, kv_pos, kv_seg)
        attn = constrain(attn, ("act_batch", "act_len", "act_kv_heads", None, None))
        out = _project(attn, p["o_proj"], "o_proj", 3, ctx, idx)
        if gemma:
            out = rms_norm(out, p["post_attn_norm"], eps, True)
        h = constrain(h + out, RESIDUAL)
        x = rms_norm(h, p["mlp_norm"], eps, gemma)
        gate_up = _project(x, p["fc1"], "fc1", 1, ctx, idx)  # [b, t, 2, mlp]
        gate_up = constrain(gate_up, ("act_batch", "act_len", None, "act_mlp"))
        act = act_fn(gate_up[..., 0, :]) * gate_up[..., 1, :]
        out = _project(act, p["fc2"], "fc2", 1, ctx, idx)
        if gemma:
            out = rms_norm(out, p["post_mlp_norm"], eps, True)
        h = constrain(h + out, RESIDUAL)
        return (h if ctx.cache is None else (h, k_all, v_all)), None

    return layer


def _fold_lora(model: Transformer, sign: float) -> None:
    spec = model.lora
    if isinstance(spec, AdapterBank):
        raise ConfigError("a bank of adapters cannot be merged into one base; merge one arm's view (arm_model)")
    for target in spec.targets if spec else ():
        proj = getattr(model.layers, target)
        a, b, w = proj.lora_a.get_value(), proj.lora_b.get_value(), proj.kernel.get_value()
        delta = jax.vmap(delta_weight)(a, b)  # over layers
        if spec.layers:  # only the adapted layers
            on = jnp.isin(jnp.arange(delta.shape[0]), jnp.asarray(spec.layers)).astype(delta.dtype)
            delta = delta * on.reshape((-1,) + (1,) * (delta.ndim - 1))
        merged = (w.astype(jnp.float32) + sign * spec.scale_for(target) * delta).astype(w.dtype)
        proj.kernel.set_value(jax.device_put(merged, w.sharding))


def merge_lora(model: Transformer) -> None:
    """Folds the adapters into the kernels (W + scale·A·B); the forward then skips the LoRA path.

    Exact in float32; with a bfloat16 base the merged kernel is rounded to bfloat16.
    """
    if model.merged:
        raise ValueError("adapters are already merged")
    _fold_lora(model, +1.0)
    model.merged = True


def unmerge_lora(model: Transformer) -> None:
    """Subtracts the adapters again (exact up to float rounding of the kernel dtype)."""
    if not model.merged:
        raise ValueError("adapters are not merged")
    _fold_lora(model, -1.0)
    model.merged = False
