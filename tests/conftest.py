"""Test setup: 8 host CPU devices (set before jax is imported) so sharded code runs here."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The runlocal arm trained once (20 steps) by main.py, shared by the end-to-end and CLI tests."""
    from tests.cli import run_main

    workdir = tmp_path_factory.mktemp("runlocal")
    return workdir, run_main(workdir)
