"""LoraSpec: which targets carry adapters, their ranks, alpha, dropout and layers (no jax)."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from lora_jax.errors import ConfigError
from lora_jax.lora.arms import TARGETS, validate_targets


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Per-target rank, alpha and scaling of one adapter."""

    targets: tuple[str, ...]
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    # Stored as sorted (target, value) pairs so the spec is hashable (it is static model metadata).
    rank_overrides: Mapping[str, int] | tuple = ()
    alpha_overrides: Mapping[str, float] | tuple = ()
    layers: tuple[int, ...] = ()  # adapters on these decoder layers only (PEFT's layers_to_transform); () = all

    def __post_init__(self):
        object.__setattr__(self, "targets", validate_targets(self.targets))
        layers = tuple(sorted({int(i) for i in self.layers}))
        if any(i < 0 for i in layers):
            raise ConfigError(f"lora.layers must be layer indices >= 0, got {self.layers}")
        object.__setattr__(self, "layers", layers)
        for name in ("rank_overrides", "alpha_overrides"):
            overrides = dict(getattr(self, name))
            bad = [k for k in overrides if k not in TARGETS]
            if bad:
                raise ConfigError(f"lora.{name} has unknown key(s) {bad}; valid: {', '.join(TARGETS)}")
            object.__setattr__(self, name, tuple(sorted((k, v) for k, v in overrides.items() if v is not None)))
        for t in self.targets:
            if self.rank_for(t) <= 0:
                raise ConfigError(f"LoRA rank for {t} must be positive, got {self.rank_for(t)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    def rank_for(self, target: str) -> int:
        return int(dict(self.rank_overrides).get(target, self.rank))

    def alpha_for(self, target: str) -> float:
        return float(dict(self.alpha_overrides).get(target, self.alpha))

    def num_adapted_layers(self, num_layers: int) -> int:
        return len(self.layers) if self.layers else num_layers

    def scale_for(self, target: str) -> float:
        """alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        r = self.rank_for(target)
        return self.alpha_for(target) / (math.sqrt(r) if self.use_rslora else r)
