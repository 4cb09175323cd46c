"""An adapter bank's state seen arm by arm: each arm's LoRA (and optimizer) state exactly as its own
single-adapter run holds it, and back.

This is what makes a joint run write what K separate runs write: arm k's checkpoint, PEFT export,
evaluation and latency all go through its view — a `Transformer` with the arm's LoraSpec sharing
the bank's frozen base arrays (no copy of the base) — and a resumed joint run stacks the arms'
checkpoints back into the bank.

Trees are matched by their key paths: a LoRA leaf's path names its target and `lora_a`/`lora_b`;
in an optimizer state the parameter-shaped subtrees (Adam's moments) are `nnx.State`s too.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.tree_util import DictKey

from lora_jax.lora.bank import AdapterBank
from lora_jax.lora.delta import init_lora_tensor
from lora_jax.model.config import ModelConfig
from lora_jax.model.transformer import RuntimeOptions, Transformer


def key_names(path) -> tuple[str, ...]:
    return tuple(k.key for k in path if isinstance(k, DictKey))


def target_kind(path) -> tuple[str, str]:
    """('o_proj', 'lora_a') from a LoRA leaf's key path."""
    names = key_names(path)
    return names[-2], names[-1]


def _is_state(x) -> bool:
    return isinstance(x, nnx.State)


@dataclasses.dataclass
class ArmViews:
    """The bank's arms as single-adapter models: graphdefs and abstract LoRA states."""

    bank: AdapterBank
    graphdefs: list  # per arm: the graphdef of Transformer(cfg, spec_k)
    templates: list  # per arm: abstract LoRA state (ShapeDtypeStructs in Variables)

    @classmethod
    def build(cls, cfg: ModelConfig, bank: AdapterBank, options: RuntimeOptions) -> ArmViews:
        graphdefs, templates = [], []
        for spec in bank.specs:
            abstract = nnx.eval_shape(lambda spec=spec: Transformer(cfg, spec, options, rngs=nnx.Rngs(0)))
            graphdef, lora, _ = nnx.split(abstract, nnx.LoRAParam, ...)
            graphdefs.append(graphdef)
            templates.append(lora)
        return cls(bank, graphdefs, templates)

    # -- bank -> arm ---------------------------------------------------------------------------

    def arm_lora(self, bank_lora: nnx.State, k: int) -> nnx.State:
        """Arm k's LoRA state sliced out of the bank's (its slot, its own rank)."""
        leaves = {key_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(bank_lora)[0]}
        spec = self.bank.specs[k]

        def take(path, _):
            target, kind = target_kind(path)
            slot, r = self.bank.members(target).index(k), spec.rank_for(target)
            value = leaves[key_names(path)][:, slot]
            return value[..., :r] if kind == "lora_a" else value[:, :r]

        return jax.tree_util.tree_map_with_path(take, self.templates[k])

    def arm_opt_state(self, bank_opt_state, k: int):
        """Arm k's optimizer state: its slice of every parameter-shaped subtree, the counters as they are."""
        return jax.tree.map(lambda x: self.arm_lora(x, k) if _is_state(x) else x, bank_opt_state, is_leaf=_is_state)

    def split(self, bank_lora, bank_opt_state=None) -> list[tuple]:
        """[(lora_k, opt_state_k)] for every arm, in one jitted program."""
        return self._split_program(bank_lora, bank_opt_state)

    @functools.cached_property
    def _split_program(self):
        """Jitted once per views: a joint run splits at every checkpoint, evaluation and export, and a
        new jax.jit of a new closure would compile each time."""

        def views(lora, opt):
            return [
                (self.arm_lora(lora, k), None if opt is None else self.arm_opt_state(opt, k))
                for k in range(self.bank.num_arms)
            ]

        return jax.jit(views)

    # -- arm -> bank ---------------------------------------------------------------------------

    def stack_lora(self, bank_lora: nnx.State, arm_loras: list) -> nnx.State:
        """The bank's LoRA state holding each arm's values (padding zero); `bank_lora` gives the layout."""
        arm_leaves = [{key_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(a)[0]} for a in arm_loras]

        def fill(path, leaf):
            target, kind = target_kind(path)
            out = jnp.zeros(leaf.shape, leaf.dtype)
            for slot, k in enumerate(self.bank.members(target)):
                value = arm_leaves[k][key_names(path)]
                r = value.shape[-1] if kind == "lora_a" else value.shape[1]
                out = out.at[:, slot, ..., :r].set(value) if kind == "lora_a" else out.at[:, slot, :r].set(value)
            return out

        return jax.tree_util.tree_map_with_path(fill, bank_lora)

    def stack(self, bank_lora, bank_opt_state, arms: list[tuple]):
        """(bank lora, bank optimizer state) from [(lora_k, opt_state_k)], on the bank's shardings."""
        loras, opts = [a[0] for a in arms], [a[1] for a in arms]

        def stacked(lora, opt, loras, opts):
            def one(x, *arm_xs):
                return self.stack_lora(x, list(arm_xs)) if _is_state(x) else arm_xs[0]

            return self.stack_lora(lora, loras), jax.tree.map(one, opt, *opts, is_leaf=_is_state)

        out_sh = jax.tree.map(lambda x: x.sharding, (bank_lora, bank_opt_state))
        return jax.jit(stacked, out_shardings=out_sh)(bank_lora, bank_opt_state, loras, opts)

    # -- fresh adapters --------------------------------------------------------------------------

    def init_bank_lora(self, bank_lora: nnx.State, seed: int) -> nnx.State:
        """Fresh adapters, arm k's exactly those its own run draws from `seed` (A random, B zero)."""
        arms = []
        for k in range(self.bank.num_arms):

            def draw(path, var):
                names = key_names(path)  # the flat-state path its own run's init hashes
                return init_lora_tensor(names, var.shape, seed, None, zeros=names[-1] == "lora_b")

            arms.append(jax.tree_util.tree_map_with_path(draw, self.templates[k]))
        return self.stack(bank_lora, None, [(a, None) for a in arms])[0]

    def arm_model(self, k: int, arm_lora, frozen) -> Transformer:
        """Arm k as a single-adapter model over the bank's frozen base arrays (shared, not copied)."""
        return nnx.merge(self.graphdefs[k], arm_lora, frozen)
