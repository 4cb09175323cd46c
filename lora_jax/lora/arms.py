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
