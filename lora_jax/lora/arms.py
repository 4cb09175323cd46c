"""The study's LoRA targets and arms: one table, importable without jax (configs/ and launch/ read it)."""

from __future__ import annotations

from typing import Iterable

from lora_jax.errors import ConfigError

TARGETS = ("qkv", "o_proj", "fc1", "fc2")


# The study's nine arms, by the token used in config file names.
ARMS: dict[str, tuple[str, ...]] = {
    "qkv": ("qkv",),
    "oproj": ("o_proj",),
    "fc1": ("fc1",),
    "fc2": ("fc2",),
    "oproj_fc1": ("o_proj", "fc1"),
    "qkv_fc1": ("qkv", "fc1"),
    "oproj_fc2": ("o_proj", "fc2"),
    "qkv_fc2": ("qkv", "fc2"),
    "all": TARGETS,
}


def validate_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """Returns the targets in canonical order; an unknown name is a ValueError naming the valid ones."""
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown LoRA target(s) {unknown}; valid targets: {', '.join(TARGETS)}")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"duplicate LoRA targets in {targets}")
    return tuple(t for t in TARGETS if t in targets)


def arm_name(targets) -> str:
    """The study's arm token of a set of targets ("oproj_fc2", "all"); targets outside the nine arms
    join their tokens the same way (o_proj -> oproj)."""
    targets = validate_targets(targets)
    for name, arm_targets in ARMS.items():
        if validate_targets(arm_targets) == targets:
            return name
    return "_".join(t.replace("_", "") for t in targets)


# Arm variants: a study arm trained with other optimizer settings, named <arm>@<setting>=<value>[@…]
# (e.g. "oproj@lp=16", "oproj_fc2@lr_fc2=0.5"). Each variant is an arm of its own (its own run name,
# checkpoints and report row), so one joint run can train several settings of one target set.
VARIANT_SETTINGS = {
    "lp": "optim.loraplus_ratio",  # LoRA+: B's learning rate = this x A's
    "lr_qkv": "optim.lr_per_target.qkv",  # learning-rate multiplier of one target's adapters
    "lr_oproj": "optim.lr_per_target.o_proj",
    "lr_fc1": "optim.lr_per_target.fc1",
    "lr_fc2": "optim.lr_per_target.fc2",
}


def parse_arm(name: str) -> tuple[str, dict[str, float]]:
    """ "oproj@lp=16" -> ("oproj", {"optim.loraplus_ratio": 16.0}); a plain arm -> (arm, {}). A ConfigError
    names what is wrong: an unknown study arm or setting, a value that is not a positive number."""
    base, *settings = str(name).split("@")
    if base not in ARMS:
        raise ConfigError(f"arm {name!r}: {base!r} is not a study arm; valid arms: {', '.join(ARMS)}")
    out = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        if key not in VARIANT_SETTINGS:
            raise ConfigError(f"arm {name!r}: unknown setting {key!r}; valid: {', '.join(VARIANT_SETTINGS)}")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not 0 < number < float("inf"):
            raise ConfigError(f"arm {name!r}: {key}={value!r} must be a number > 0")
        if VARIANT_SETTINGS[key] in out:
            raise ConfigError(f"arm {name!r}: {key} is set twice")
        out[VARIANT_SETTINGS[key]] = number
    return base, out
