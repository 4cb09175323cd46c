"""Running main.py as a user does: a subprocess with one CPU device, as on a laptop."""

import hashlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CPU device, as on a laptop; the session's compilation cache (JAX_COMPILATION_CACHE_DIR, set by
# tests/conftest.py) is inherited, so every subprocess compiles the same tiny programs once.
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
ARM = "configs/cocohd_oproj_fc2.py:runlocal"


# Runs measure latency only where a test reads it (the local runner's study table): compiling the base,
# unmerged and merged decode programs is most of an evaluation's cost. tests/serve/test_latency.py
# checks the measurement itself.
NO_LATENCY = "--config.eval.evaluators=('loss','generate')"


def main_cmd(workdir, *overrides, config=ARM):
    """main.py's command line; without an eval.evaluators override the run skips latency."""
    chosen = any(o.startswith("--config.eval.evaluators=") for o in overrides)
    return [
        sys.executable,
        os.path.join(ROOT, "main.py"),
        f"--config={os.path.join(ROOT, config)}",
        f"--workdir={workdir}",
        *(() if chosen else (NO_LATENCY,)),
        *overrides,
    ]


def run_main_ok(workdir, *overrides, config=ARM) -> subprocess.CompletedProcess:
    """main.py run to success (its stderr's tail otherwise); the finished process, output captured."""
    proc = subprocess.run(
        main_cmd(workdir, *overrides, config=config), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_main(workdir, *overrides, config=ARM):
    run_main_ok(workdir, *overrides, config=config)
    return json.loads((workdir / "summary.json").read_text())


def file_hashes(directory) -> dict:
    """Every file under a directory with the sha256 of its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def reference_copy(reference_run, directory):
    """A copy of the shared reference run's workdir (tests/conftest.py) in `directory`, for a test that
    runs main.py on it: main.py writes (a probe file, at least) into any workdir it is given."""
    import shutil

    shutil.copytree(reference_run[0], directory)
    return directory
