"""Test setup: 8 host CPU devices (set before jax is imported) so sharded code runs here."""

import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One JAX compilation cache for this test session, empty at its start: the tests, their main.py
# subprocesses and pytest-xdist's workers (which inherit the environment) compile each tiny program
# once. A cache that outlived the session would hide how long a fresh clone's suite takes.
_CACHE_PREFIX = os.path.join(tempfile.gettempdir(), "lora_jax_test_jit_cache_")
if "LORA_JAX_TEST_JIT_CACHE" not in os.environ:
    os.environ["LORA_JAX_TEST_JIT_CACHE"] = tempfile.mkdtemp(prefix=os.path.basename(_CACHE_PREFIX))
os.environ.update(
    JAX_COMPILATION_CACHE_DIR=os.environ["LORA_JAX_TEST_JIT_CACHE"],
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The runlocal arm trained once (20 steps) by main.py, shared by the end-to-end and CLI tests.

    Built once per session, not once per pytest-xdist worker: the workers share their session's
    temporary root and take a file lock, so the first builds it and the others wait and read it.
    Shared means read-only: a test that runs main.py on it works on a copy (tests/cli.reference_copy)."""
    import json
    import shutil

    from filelock import FileLock

    from tests.cli import run_main

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # xdist: <session root>/popen-gwN
    workdir = root / "reference_run"
    with FileLock(str(root / "reference_run.lock")):
        if not (workdir / "summary.json").exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a build that failed part-way is not resumed
            run_main(workdir)
    return workdir, json.loads((workdir / "summary.json").read_text())


def pytest_unconfigure(config):
    """The session's compilation cache goes with the session (removed by the process that made it)."""
    cache = os.environ["LORA_JAX_TEST_JIT_CACHE"]
    if not hasattr(config, "workerinput") and cache.startswith(_CACHE_PREFIX):  # not an xdist worker
        shutil.rmtree(cache, ignore_errors=True)
