"""benchmarks/device_suite.py runs end to end on CPU at tiny shapes, on jax, flax, optax and numpy alone
(the lent GPU machine has no ml-collections, clu, tensorflow-datasets or grain), and its JSON holds
every section's figures."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs the suite with the packages a jax-only machine lacks made unimportable.
BLOCKED = ("ml_collections", "clu", "tensorflow_datasets", "tensorflow", "grain", "torch", "transformers", "peft")
RUNNER = """
import importlib.abc, runpy, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed on the device machine")
sys.meta_path.insert(0, Block())
sys.argv = ["device_suite.py"] + {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def test_device_suite_runs_tiny_on_cpu_without_the_run_stack(tmp_path):
    out = tmp_path / "suite.json"
    argv = ["--shape", "tiny", "--out", str(out)]
    code = RUNNER.format(blocked=BLOCKED, argv=argv, script=os.path.join(REPO, "benchmarks", "device_suite.py"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    assert "errors" not in result, result["errors"]
    assert result["platform"] == "cpu" and result["peak"]["source"].startswith("measured")
    assert result["dtype"] == "bfloat16"  # the accelerators' path, run on CPU
    assert [r["arm"] for r in result["train"]] == ["o_proj", "o_proj+fc2", "all"]
    for r in result["train"]:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 2 and math.isclose(r["mfu"], r["of_measured_matmul_peak"])
    # More adapted matmuls, more FLOPs per step.
    flops = [r["tflop_per_step"] for r in result["train"]]
    assert flops[0] < flops[1] < flops[2]
    decode = {(r["variant"], r["batch"]) for r in result["decode"]}
    assert decode == {(v, b) for v in ("base", "unmerged", "merged") for b in (1, 2)}
    assert all(r["tpot_ms_p50"] > 0 and r["ttft_ms_p50"] > 0 for r in result["decode"])
    assert result["joint"]["arms"] == 9 and result["joint"]["ratio"] > 0
    assert [r["arm"] for r in result["overhead"]] == [
        "qkv",
        "oproj",
        "fc1",
        "fc2",
        "oproj_fc1",
        "qkv_fc1",
        "oproj_fc2",
        "qkv_fc2",
        "all",
    ]
    assert all(math.isfinite(r["overhead_p95"]) for r in result["overhead"])
    # The table is printed too.
    assert "unmerged vs base" in proc.stdout and "MFU" in proc.stdout


def test_datasheet_peak_of_the_device_kind():
    sys.path.insert(0, REPO)
    from benchmarks.device_suite import datasheet_peak

    assert datasheet_peak("NVIDIA H200")[0] == 989.5e12
    assert datasheet_peak("NVIDIA H100 PCIe")[0] == 756e12  # before the SXM entry's "H100"
    assert datasheet_peak("NVIDIA H100 80GB HBM3")[0] == 989.5e12
    assert datasheet_peak("NVIDIA H100 NVL")[0] == 835.5e12
    assert datasheet_peak("NVIDIA L40S")[0] == 362.05e12  # not L4's, whose name it contains
    assert datasheet_peak("NVIDIA L4")[0] == 121e12
    assert datasheet_peak("TPU v5 lite")[0] == 197e12
    assert datasheet_peak("TPU v5")[0] == 459e12  # jax's device_kind of a v5p
    assert datasheet_peak("cpu") is None
