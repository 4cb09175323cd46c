"""The pure, jitted LoRA train step: token-weighted chunked loss, accumulation inside the step.

Only the LoRA leaves are differentiated and carry optimizer state; the frozen base is a separate
argument that is never differentiated (no full weight gradient is ever formed).
loss = sum(nll * loss_mask) / sum(loss_mask) over the whole global batch: micro-batch sums of nll
and of gradients are accumulated and divided once, so clipping, the schedule and Adam see one update
and accumulation 4 equals accumulation 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lora_jax.lora.bank import AdapterBank
from lora_jax.lora.delta import dropout_key, row_dropout_keys
from lora_jax.model.arm_views import key_names, target_kind
from lora_jax.sharding import batch_sharding, under_mesh
from lora_jax.train.loss import chunked_cross_entropy


@dataclasses.dataclass(frozen=True)
class StepOptions:
    grad_accum_steps: int = 1
    loss_chunk_tokens: int = 512
    seed: int = 0
    use_dropout: bool = False


@dataclasses.dataclass(frozen=True)
class LrScale:
    """An arm's learning-rate multipliers: one per target (on A and B), and LoRA+'s ratio (B's learning
    rate = ratio x A's, as PEFT's create_loraplus_optimizer sets it). A multiplier scales the whole
    AdamW update of the leaf (its decoupled weight decay included), exactly what a parameter group
    with that learning rate does."""

    per_target: tuple[tuple[str, float], ...] = ()
    loraplus_ratio: float = 1.0

    def factor(self, target: str, kind: str) -> float:
        return dict(self.per_target).get(target, 1.0) * (self.loraplus_ratio if kind == "lora_b" else 1.0)

    @property
    def is_identity(self) -> bool:
        return self.loraplus_ratio == 1.0 and all(m == 1.0 for _, m in self.per_target)


def make_optimizer(learning_rate, warmup_steps, total_steps, weight_decay, grad_clip_norm, bank=None, lr_scales=None):
    """AdamW with linear warmup + cosine decay, after global-norm clipping. Returns (tx, schedule).

    With an AdapterBank each arm is clipped by its own norm; AdamW is elementwise, so every arm is
    updated exactly as its own optimizer would update it. lr_scales: each arm's LrScale (one for a
    plain model; None = all 1); in a bank a target's arms share its slot axis, so the multipliers of
    a leaf are a per-slot scale."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps, decay_steps=max(total_steps, 1)
    )
    parts = []
    if grad_clip_norm and grad_clip_norm > 0:
        if bank is None:
            parts.append(optax.clip_by_global_norm(grad_clip_norm))
        else:
            parts.append(clip_by_arm_global_norm(grad_clip_norm, bank))
    adamw = optax.adamw(schedule, weight_decay=weight_decay)
    if lr_scales and not all(s.is_identity for s in lr_scales):
        adamw = scaled_by_lr_scale(adamw, lr_scales, bank)
    parts.append(adamw)
    return optax.chain(*parts), schedule


def scaled_by_lr_scale(inner: optax.GradientTransformation, lr_scales, bank=None) -> optax.GradientTransformation:
    """`inner` (AdamW) with each LoRA leaf's update multiplied by its arm's LrScale factor (per slot in a
    bank). Its state is inner's own: a checkpoint has the same layout whatever the settings, so arms
    of different settings stack in one bank, split into their own runs' states, and resume runs
    saved before these settings existed."""

    def scale(path, u):
        target, kind = target_kind(path)
        if bank is None:
            return (u * lr_scales[0].factor(target, kind)).astype(u.dtype)
        factors = jnp.asarray([lr_scales[k].factor(target, kind) for k in bank.members(target)], u.dtype)
        return u * factors.reshape((1, -1) + (1,) * (u.ndim - 2))

    def update(updates, state, params=None):
        updates, state = inner.update(updates, state, params)
        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(inner.init, update)


def batch_loss_sums(graphdef, lora, frozen, batch, chunk, key):
    """(sum of nll * mask, sum of mask) of one (micro-)batch; with an adapter bank the nll sum is
    per arm, [K]: every row runs through every arm (grouped rows, see adapter_bank.py)."""
    model = nnx.merge(graphdef, lora, frozen)
    if isinstance(model.lora, AdapterBank):
        return _bank_loss_sums(model, batch, chunk, key)
    images = {"pixels": batch["pixels"]} if "pixels" in batch else {}  # LLaVA: each row's image
    hidden, _ = model.hidden_states(
        batch["tokens"], batch["positions"], batch["segment_ids"], dropout_key=key, **images
    )
    w, cap = model.lm_head_weight(), model.logit_softcap
    return chunked_cross_entropy(hidden, w, batch["targets"], batch["loss_mask"], chunk, cap)


def _bank_loss_sums(model, batch, chunk, key):
    k = model.lora.num_arms
    b = batch["tokens"].shape[0]
    rows = jnp.arange(b * k) // k  # row b*K + arm reads input row b
    if key is not None and key.ndim == 1:  # per-row dropout keys: arm k's row b gets row b's key, as alone
        key = key[rows]
    tokens, positions, segments = (jnp.repeat(batch[n], k, axis=0) for n in ("tokens", "positions", "segment_ids"))
    hidden, _ = model.hidden_states(tokens, positions, segments, dropout_key=key)
    hidden = hidden.reshape((b, k) + hidden.shape[1:])
    w, targets, mask = model.lm_head_weight(), batch["targets"], batch["loss_mask"]
    cap = model.logit_softcap
    nll = jnp.stack([chunked_cross_entropy(hidden[:, a], w, targets, mask, chunk, cap)[0] for a in range(k)])
    return nll, jnp.sum(mask.astype(jnp.float32))


def micro_batches(batch: dict, n: int) -> dict:
    """[B, T] -> [n, B/n, T] taking rows i::n, so every micro-batch stays spread over the data axes."""
    return {k: jnp.swapaxes(v.reshape((v.shape[0] // n, n) + v.shape[1:]), 0, 1) for k, v in batch.items()}


def make_train_step(graphdef, tx: optax.GradientTransformation, opts: StepOptions, schedule, mesh=None, bank=None):
    """(lora, opt_state, frozen, batch, step) -> (lora, opt_state, metrics). Jit it with shardings.

    With `mesh`, activations inside are pinned to their logical shardings (`sharding.constrain`).
    With an AdapterBank the K arms train on the same batch; "loss" and "grad_norm" are then [K]. The
    gradient of the summed loss is each arm's own (its adapters touch only its rows), and every arm's
    loss is divided by the same token count, so each arm's update is the one its own run makes."""

    def step_fn(lora, opt_state, frozen, batch, step):
        def loss(lo, mb, k):
            nll, n = batch_loss_sums(graphdef, lo, frozen, mb, opts.loss_chunk_tokens, k)
            return jnp.sum(nll), (nll, n)

        grad_fn = jax.value_and_grad(loss, has_aux=True)
        batch = dict(batch)
        if opts.use_dropout:  # per-row keys travel with their rows into the micro-batches
            batch["dropout_keys"] = row_dropout_keys(dropout_key(opts.seed, step), batch["tokens"].shape[0])
        micro = micro_batches(batch, opts.grad_accum_steps)

        def accumulate(carry, mb):
            grads_sum, nll_sum, count = carry
            (_, (nll, n)), grads = grad_fn(lora, mb, mb.get("dropout_keys"))
            return (jax.tree.map(jnp.add, grads_sum, grads), nll_sum + nll, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, lora)
        nll_shape = (bank.num_arms,) if bank is not None else ()
        init = (zeros, jnp.zeros(nll_shape, jnp.float32), jnp.zeros((), jnp.float32))
        (grads, nll, count), _ = jax.lax.scan(accumulate, init, micro)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, opt_state, lora)
        lora = optax.apply_updates(lora, updates)
        metrics = {
            "loss": nll / denom,
            "grad_norm": optax.global_norm(grads) if bank is None else arm_grad_norms(grads, bank),
            "learning_rate": schedule(step),
            "target_tokens": count,
            "real_tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),  # not padding
            "adapter_norm": adapter_norm(lora, bank),  # after the update: what divergence.py watches
        }
        return lora, opt_state, metrics

    return step_fn if mesh is None else under_mesh(step_fn, mesh)


def adapter_norm(lora, bank=None) -> jax.Array:
    """||LoRA weights||_F over the whole tree ([K]: each arm's own, with an AdapterBank; the slot axis
    is axis 1). Computed as m * ||x / m|| with m = max |x|, so weights past ~1e19 (whose squares
    overflow float32) still give their finite norm; NaN/Inf anywhere gives a non-finite norm."""
    leaves = [(key_names(p), x.astype(jnp.float32)) for p, x in jax.tree_util.tree_flatten_with_path(lora)[0]]
    if bank is None:
        m = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for _, x in leaves]))
        scale = jnp.where(m > 0, m, 1.0)
        return scale * jnp.sqrt(sum(jnp.sum(jnp.square(x / scale)) for _, x in leaves))
    k = bank.num_arms
    items = [
        (jnp.asarray(bank.members(names[-2])), x, tuple(i for i in range(x.ndim) if i != 1)) for names, x in leaves
    ]
    m = jnp.zeros((k,), jnp.float32)
    for members, x, axes in items:
        m = m.at[members].max(jnp.max(jnp.abs(x), axis=axes))
    scale = jnp.where(m > 0, m, 1.0)
    sq = jnp.zeros((k,), jnp.float32)
    for members, x, axes in items:
        s = scale[members].reshape((1, -1) + (1,) * (x.ndim - 2))
        sq = sq.at[members].add(jnp.sum(jnp.square(x / s), axis=axes))
    return scale * jnp.sqrt(sq)


def make_eval_step(graphdef, chunk: int, mesh=None):
    def eval_fn(lora, frozen, batch) -> dict[str, Any]:
        nll, n = batch_loss_sums(graphdef, lora, frozen, batch, chunk, None)
        return {"nll_sum": nll, "target_tokens": n}

    return eval_fn if mesh is None else under_mesh(eval_fn, mesh)


def clip_by_arm_global_norm(max_norm: float, bank: AdapterBank) -> optax.GradientTransformation:
    """optax.clip_by_global_norm applied to each arm on its own (its gradient norm over its own
    targets), as each arm's separate run clips."""

    def update(updates, state, params=None):
        del params
        norms = arm_grad_norms(updates, bank)
        factor = jnp.where(norms < max_norm, 1.0, max_norm / norms)  # [K]

        def scale(path, g):
            members = jnp.asarray(bank.members(target_kind(path)[0]))
            f = factor[members].reshape((1, -1) + (1,) * (g.ndim - 2))
            return (g * f).astype(g.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def arm_grad_norms(grads, bank: AdapterBank) -> jax.Array:
    """[K]: each arm's global gradient norm over its own adapters (the slot axis is axis 1)."""
    sq = jnp.zeros((bank.num_arms,), jnp.float32)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        members = jnp.asarray(bank.members(target_kind(path)[0]))
        per_slot = jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(i for i in range(g.ndim) if i != 1))
        sq = sq.at[members].add(per_slot)
    return jnp.sqrt(sq)


@dataclasses.dataclass
class CompiledSteps:
    """A model split for training and its jitted steps (see `compile_steps`)."""

    graphdef: Any
    lora: Any  # the trained leaves (nnx.LoRAParam)
    frozen: Any  # everything else, never differentiated
    opt_state: Any
    train_step: Any  # (lora, opt_state, frozen, batch, step) -> (lora, opt_state, metrics); lora, opt_state donated
    eval_step: Any  # (lora, frozen, batch) -> {"nll_sum", "target_tokens"}
    batch_sharding: Any


def compile_steps(model, tx: optax.GradientTransformation, schedule, opts: StepOptions, mesh) -> CompiledSteps:
    """Splits `model` (plain or with an AdapterBank) into LoRA / frozen states, initialises `tx` on the
    LoRA leaves and jits the train and eval steps with explicit shardings on `mesh`. Needs no run
    config: the trainer and the device benchmark suite both build their steps here."""
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    bank = model.lora if isinstance(model.lora, AdapterBank) else None
    # Explicit out_shardings: moments like their LoRA leaf, everything else (the step counter)
    # replicated — left to itself it lands on one device and clashes in jit ("incompatible devices").
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    lora_leaf_sh = jax.tree.map(lambda x: x.sharding, lora)
    opt_out_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, jax.eval_shape(tx.init, lora), lora_leaf_sh, transform_non_params=lambda _: replicated
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_out_sh)(lora)
    shard_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    lora_sh, opt_sh, frozen_sh, batch_sh = shard_of(lora), shard_of(opt_state), shard_of(frozen), batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(graphdef, tx, opts, schedule, mesh, bank),
        in_shardings=(lora_sh, opt_sh, frozen_sh, batch_sh, None),
        out_shardings=(lora_sh, opt_sh, None),
        donate_argnums=(0, 1),
    )
    eval_step = jax.jit(
        make_eval_step(graphdef, opts.loss_chunk_tokens, mesh), in_shardings=(lora_sh, frozen_sh, batch_sh)
    )
    return CompiledSteps(graphdef, lora, frozen, opt_state, train_step, eval_step, batch_sh)
