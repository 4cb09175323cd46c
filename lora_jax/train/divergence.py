"""Divergence: when a run's loss or adapters have left any useful range, stop it (config
`train.divergence.*`).

Checked on host values the train step already returns (its "loss" and "adapter_norm"), at every
log step and every checkpoint step, so a checkpoint is only ever saved from a state that passed.
Three rules, each reported with the step and the value:

* non-finite: the loss or the adapter norm is NaN/Inf.
* norm growth: ||LoRA weights||_F > max_norm_growth x their norm at initialisation. `lora_b` starts
  at zero, so the initial norm is that of the random `lora_a`. AdamW moves each weight by about the
  learning rate per step, so a healthy run grows its adapters slowly (the runlocal arm, at its high
  learning rate 2e-2: 2.2x in 20 steps); a learning rate far too large multiplies the norm at once
  (1e30: 6.6e30x after one update, while the loss of the random base stays at ln(vocab) — which is
  why the loss alone cannot tell).
* loss rise: loss > (lowest loss seen at a check so far) + max_loss_rise, at `patience`
  consecutive checks (one noisy batch is not a divergence). The running minimum restarts on resume.

A rule whose limit is 0 is off.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from lora_jax.errors import UserError


class DivergenceError(UserError, FloatingPointError):
    """The run diverged: the message names the step, the rule, the value and what was kept."""


@dataclasses.dataclass(frozen=True)
class DivergenceLimits:
    max_loss_rise: float = 1.0  # nats above the running minimum (0 = off)
    patience: int = 3  # consecutive checks the loss rule must hold
    max_norm_growth: float = 20.0  # x the initial adapter norm (0 = off)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> DivergenceLimits:
        d = config.train.divergence
        return cls(float(d.max_loss_rise), int(d.patience), float(d.max_norm_growth))


@dataclasses.dataclass(frozen=True)
class Divergence:
    """What a detector found: the step, the rule ("non_finite" | "norm_growth" | "loss_rise"), the
    offending value, its limit, and a one-line description."""

    step: int
    rule: str
    value: float
    limit: float
    detail: str

    def to_json(self) -> dict:
        # JSON has no NaN/Inf: non-finite values are written as strings ("nan", "inf").
        value = self.value if math.isfinite(self.value) else str(self.value)
        return {"step": self.step, "rule": self.rule, "value": value, "limit": self.limit, "detail": self.detail}


class DivergenceDetector:
    """Feed it (step, loss, adapter norm) at each check; it returns a Divergence once a rule fires."""

    def __init__(self, limits: DivergenceLimits, initial_norm: float):
        """initial_norm: ||LoRA weights||_F at initialisation (> 0: `lora_a` is random)."""
        self.limits = limits
        self.initial_norm = float(initial_norm)
        self.min_loss = math.inf
        self.rising = 0  # consecutive checks with loss > min_loss + max_loss_rise

    def check(self, step: int, loss: float, adapter_norm: float) -> Divergence | None:
        loss, norm, lim = float(loss), float(adapter_norm), self.limits
        if not math.isfinite(loss):
            return Divergence(step, "non_finite", loss, math.inf, f"non-finite loss {loss}")
        if not math.isfinite(norm):
            return Divergence(step, "non_finite", norm, math.inf, f"non-finite adapter norm {norm}")
        if lim.max_norm_growth > 0 and norm > lim.max_norm_growth * self.initial_norm:
            growth = norm / self.initial_norm
            return Divergence(
                step,
                "norm_growth",
                norm,
                lim.max_norm_growth * self.initial_norm,
                f"adapter norm {norm:.3g} is {growth:.3g}x its initial {self.initial_norm:.3g} "
                f"(train.divergence.max_norm_growth={lim.max_norm_growth:g})",
            )
        if lim.max_loss_rise > 0:
            self.rising = self.rising + 1 if loss > self.min_loss + lim.max_loss_rise else 0
            if self.rising >= lim.patience:
                return Divergence(
                    step,
                    "loss_rise",
                    loss,
                    self.min_loss + lim.max_loss_rise,
                    f"loss {loss:.4f} stayed more than {lim.max_loss_rise:g} above its minimum "
                    f"{self.min_loss:.4f} for {self.rising} checks (train.divergence.max_loss_rise="
                    f"{lim.max_loss_rise:g}, train.divergence.patience={lim.patience})",
                )
        self.min_loss = min(self.min_loss, loss)
        return None


def diverged_message(found: Divergence, last_checkpoint: str | None) -> str:
    """The one line a diverged run stops with."""
    kept = f"the last checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved before it"
    return f"training diverged at step {found.step}: {found.detail}; stopped without exporting an adapter, {kept}"
