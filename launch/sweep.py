"""A sweep file's runs, checked before anything is launched, and each run's main.py command.

`--sweep=<file>.py[:arg]`: the file's `get_sweep(arg)` returns runs {"config", "config_arg",
"overrides", "name"} (configs/sweeps/study.py is the study's grid). Checked here, all at once:
the sweep file and every config file exist, every override names a key of configs/base.py, and
no two runs share a workdir name — a bad sweep is one error line, and nothing has started.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shlex
import sys
from typing import Iterable

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SweepError(ValueError):
    """A sweep that cannot be launched; the message names the run and what is wrong."""


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # the workdir name under the sweep's root
    config: str  # arm config file, relative to the repository root
    config_arg: str | None  # e.g. "runlocal"
    overrides: tuple[tuple[str, object], ...]  # (("train.seed", 0), …)

    def config_flag(self) -> str:
        return f"--config={self.config}" + (f":{self.config_arg}" if self.config_arg else "")

    def args(self, workdir: str) -> list[str]:
        """main.py's arguments for this run with `workdir` (a path or gs:// URL)."""
        return [self.config_flag(), f"--workdir={workdir}"] + [
            f"--config.{k}={_flag_value(v)}" for k, v in self.overrides
        ]

    def command(self, workdir: str, python: str = sys.executable) -> list[str]:
        return [python, "main.py", *self.args(workdir)]

    def shell(self, workdir: str, python: str = "python") -> str:
        return shlex.join(self.command(workdir, python))


def _flag_value(value) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def base_config():
    """configs/base.py's config: every key, locked (plain values: importing it imports no jax)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from configs import base

    return base.get_config()


def unknown_config_keys(keys: Iterable[str]) -> list[str]:
    """The dotted keys (as `--config.<key>=` names them, e.g. "eval.latency.warmup") that configs/base.py's
    config lacks, sorted. A key names a field or a section; each part must be a key of the ConfigDict
    above it (ConfigDict's own `in`, so a method name such as "train.items" is no key)."""
    schema = base_config()

    def known(key: str) -> bool:
        node = schema
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                return False
            node = node[part]
        return True

    return sorted(k for k in set(keys) if not known(k))


def load(spec: str) -> list[Run]:
    """The checked runs of `--sweep=<file>.py[:arg]`."""
    path, _, arg = spec.partition(":")
    full = path if os.path.isabs(path) else os.path.join(ROOT, path)
    if not os.path.isfile(full):
        raise SweepError(f"--sweep: no such sweep file: {path}")
    module_spec = importlib.util.spec_from_file_location("lora_jax_sweep", full)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        raw = module.get_sweep(arg or None)
    except Exception as e:  # noqa: BLE001 — whatever the sweep file raised, as one line
        raise SweepError(f"--sweep={spec}: {type(e).__name__}: {e}") from None
    runs, seen = [], {}
    for i, r in enumerate(raw):
        where = f"--sweep={spec}: run {i} ({r.get('name', '?')})"
        if not r.get("name") or "/" in r["name"]:
            raise SweepError(f"{where}: needs a workdir name without '/'")
        if not os.path.isfile(os.path.join(ROOT, r["config"])):
            raise SweepError(f"{where}: no such config file: {r['config']}")
        unknown = unknown_config_keys(r.get("overrides", {}))
        if unknown:
            raise SweepError(f"{where}: unknown config key(s) {', '.join(unknown)} (configs/base.py lists every key)")
        if r["name"] in seen:
            raise SweepError(f"{where}: workdir name {r['name']!r} is also run {seen[r['name']]}'s")
        seen[r["name"]] = i
        runs.append(Run(r["name"], r["config"], r.get("config_arg"), tuple(sorted(r.get("overrides", {}).items()))))
    if not runs:
        raise SweepError(f"--sweep={spec}: the sweep has no runs")
    return runs
