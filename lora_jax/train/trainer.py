"""The trainer: owns the run's state (LoRA weights, optimizer state, frozen base) and its jitted
steps, and gives the current model for prediction and generation; exports the PEFT adapter.

A trainer trains K arms: one (a plain model, K = 1) or every arm of an AdapterBank jointly. What
differs between the two lives here, behind one interface the training loop uses for both: the arms'
states (`split` / `stack`), arm k's view of the step metrics, arm k's model and graphdef."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from lora_jax.errors import WorkdirError
from lora_jax.io.files import write_text_atomic
from lora_jax.io.peft_adapter import BASE_FILE, export_peft
from lora_jax.lora.bank import AdapterBank
from lora_jax.model.arm_views import ArmViews
from lora_jax.model.transformer import Transformer
from lora_jax.train.step import StepOptions, adapter_norm, compile_steps, make_optimizer


def export_adapter(graphdef, lora, frozen, workdir: epath.Path, base_name: str, base_fingerprint: str = "") -> None:
    """PEFT adapter to <workdir>/adapter, written to a temporary dir and renamed. With base_fingerprint,
    also `lora_jax_base.json` (PEFT ignores it): the exact base it was trained on, which serving
    several adapters in one batch checks (lora_jax/serve/bank.py).

    Every process joins the all-gather of the (possibly sharded over hosts) LoRA arrays; process 0
    alone writes."""
    from jax.experimental import multihost_utils

    lora_host = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), lora)
    if jax.process_index() != 0:
        return
    model = nnx.merge(graphdef, lora_host, frozen)
    workdir = epath.Path(workdir)
    final, tmp = workdir / "adapter", workdir / "adapter.tmp"
    try:
        if tmp.exists():
            tmp.rmtree()
        export_peft(model, str(tmp), base_name)
        if base_fingerprint:
            write_text_atomic(tmp / BASE_FILE, json.dumps({"base_model": base_fingerprint}))
        if final.exists():
            old = workdir / "adapter.old"
            final.rename(old)
            tmp.rename(final)
            old.rmtree()
        else:
            tmp.rename(final)
    except OSError as e:  # a full or read-only disk: leave no half-written adapter behind
        if tmp.exists():
            tmp.rmtree()
        raise WorkdirError(f"{tmp}: writing the adapter failed ({e.strerror or e}); checkpoints are kept") from e


@dataclasses.dataclass
class Trainer:
    graphdef: object
    lora: object
    frozen: object
    opt_state: object
    train_step: object  # jitted (lora, opt_state, frozen, batch, step) -> (lora, opt_state, metrics)
    eval_step: object  # jitted (lora, frozen, batch) -> {"nll_sum", "target_tokens"}
    batch_sharding: object
    views: ArmViews | None = None  # an AdapterBank's arms as single-adapter models; None: one plain arm

    @property
    def num_arms(self) -> int:
        """K: the arms trained together (1 for a plain model)."""
        return self.views.bank.num_arms if self.views else 1

    @property
    def bank_arms(self) -> int:
        """K for a bank model, 0 for a plain one (what serve's per-row adapter ids need to know)."""
        return self.views.bank.num_arms if self.views else 0

    def split(self, lora, opt_state=None) -> list[tuple]:
        """[(lora_k, opt_state_k)]: each arm's state exactly as its own single-arm run holds it."""
        return self.views.split(lora, opt_state) if self.views else [(lora, opt_state)]

    def stack(self, lora, opt_state, arms: list[tuple]) -> tuple:
        """The inverse of `split`: (lora, opt_state) holding the arms' states; lora/opt_state give the layout."""
        return self.views.stack(lora, opt_state, arms) if self.views else arms[0]

    def arm_metrics(self, metrics: dict, k: int) -> dict[str, float]:
        """Arm k's view of the host step metrics: "loss", "grad_norm", "adapter_norm" are [K] in a bank
        (arm k's entry); the batch's own ("learning_rate", token counts) are scalars shared by all arms."""
        return {name: float(v[k]) if np.ndim(v) else float(v) for name, v in metrics.items()}

    def adapter_norms(self, lora) -> list[float]:
        """Each arm's ||LoRA weights||_F (train.step.adapter_norm), [K] host floats."""
        bank = self.views.bank if self.views else None
        norms = jax.jit(adapter_norm, static_argnums=1)(lora, bank)
        return [float(n) for n in np.atleast_1d(jax.device_get(norms))]

    def model(self, lora):
        """The whole model (every arm) with these LoRA weights over the frozen base."""
        return nnx.merge(self.graphdef, lora, self.frozen)

    def arm_graphdef(self, k: int):
        """The graphdef of arm k as a single-adapter model (what its PEFT export is written from)."""
        return self.views.graphdefs[k] if self.views else self.graphdef

    def arm_model(self, k: int, arm_lora):
        """Arm k as a single-adapter model over the frozen base arrays (shared, not copied); arm_lora
        is its entry of `split`."""
        return nnx.merge(self.arm_graphdef(k), arm_lora, self.frozen)

    def freeze_arms(self, lora, opt_state, arms: set[int]) -> tuple:
        """The state with the given arms' LoRA weights and optimizer moments set to zero. Such an arm
        then stays zero: with lora_a = lora_b = 0 both gradients are zero, and so are AdamW's moments
        and decay — its rows compute the base model and can no longer overflow into the others' checks."""
        zero = lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731 — not counters
        states = [jax.tree.map(zero, a) if k in arms else a for k, a in enumerate(self.split(lora, opt_state))]
        return self.stack(lora, opt_state, states)


def build_trainer(
    model: Transformer, config: ml_collections.ConfigDict, mesh, views: ArmViews | None = None, lr_scales=None
) -> Trainer:
    """Splits the model into LoRA / frozen states and jits the steps with explicit shardings on `mesh`.
    A model with an AdapterBank trains its K arms jointly (metrics "loss", "grad_norm", "adapter_norm"
    are then [K]); views: its ArmViews (built here when not given). lr_scales: each arm's
    train.step.LrScale (run.config.lr_scale of its config; None: all 1)."""
    bank = model.lora if isinstance(model.lora, AdapterBank) else None  # K arms trained jointly
    if bank is not None and views is None:
        views = ArmViews.build(model.config, bank, model.options)
    o = config.optim
    tx, schedule = make_optimizer(
        o.learning_rate, o.warmup_steps, config.train.total_steps, o.weight_decay, o.grad_clip_norm, bank, lr_scales
    )
    step_opts = StepOptions(
        o.grad_accum_steps,
        config.train.loss_chunk_tokens,
        config.train.seed,
        use_dropout=model.lora is not None and model.lora.dropout > 0,
    )
    c = compile_steps(model, tx, schedule, step_opts, mesh)
    return Trainer(
        c.graphdef, c.lora, c.frozen, c.opt_state, c.train_step, c.eval_step, c.batch_sharding, views if bank else None
    )
