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


def schema_keys() -> set[str]:
    """Every key of configs/base.py (plain values: importing it imports no lora_jax)."""
    sys.path.insert(0, ROOT)
    from configs import base

    def keys(d, prefix=""):
        for k, v in d.items():
            if hasattr(v, "items"):
                yield from keys(v, f"{prefix}{k}.")
            yield f"{prefix}{k}"

    return set(keys(base.get_config().to_dict()))


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
    schema, runs, seen = schema_keys(), [], {}
    for i, r in enumerate(raw):
        where = f"--sweep={spec}: run {i} ({r.get('name', '?')})"
        if not r.get("name") or "/" in r["name"]:
            raise SweepError(f"{where}: needs a workdir name without '/'")
        if not os.path.isfile(os.path.join(ROOT, r["config"])):
            raise SweepError(f"{where}: no such config file: {r['config']}")
        unknown = sorted(set(r.get("overrides", {})) - schema)
        if unknown:
            raise SweepError(f"{where}: unknown config key(s) {', '.join(unknown)} (configs/base.py lists every key)")
        if r["name"] in seen:
            raise SweepError(f"{where}: workdir name {r['name']!r} is also run {seen[r['name']]}'s")
        seen[r["name"]] = i
        runs.append(Run(r["name"], r["config"], r.get("config_arg"), tuple(sorted(r.get("overrides", {}).items()))))
    if not runs:
        raise SweepError(f"--sweep={spec}: the sweep has no runs")
    return runs
