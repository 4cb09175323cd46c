"""Faults: a 2-process start repeated, stale upstream data, bad images, truncated weights, a failed
adapter write."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from data import samples
from data.prepare import data_sources, prepare
from data.records import DataError
from tests.cli import ENV, ROOT, main_cmd, run_main

# 2 steps with a checkpoint after each: the start-up barriers and orbax's collective saves, quickly.
# The evaluation is the test loss alone: these tests check the adapter and the data, not generation.
SHORT = (
    "--config.train.total_steps=2",
    "--config.train.checkpoint_every_steps=1",
    "--config.eval.max_eval_batches=1",
    "--config.eval.evaluators=('loss',)",
)
# Full main.py 2-process runs in the adapter test (each ~40 s here); the start-up race is hammered
# separately, 6 times, by a script that runs exactly main.py's start-up path (a few seconds each).
FULL_RUNS = int(os.environ.get("LORA_JAX_TWO_PROCESS_RUNS", "1"))


def read_adapter(workdir):
    from safetensors.numpy import load_file

    return load_file(str(workdir / "adapter" / "adapter_model.safetensors"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("round_", range(6))  # 3 starts with each process the late one
def test_two_process_start_never_races(tmp_path, round_):
    """Distributed init, the checkpoint store on a fresh workdir, a save, and the store reopened, with one
    process held back as a slower host would be (the old per-process check crashed every such start)."""
    port, late = _free_port(), round_ % 2  # alternate which process is late
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "two_process_start.py"), str(tmp_path), str(port), str(i)]
            + ["0.5" if i == late else "0"],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0 and "ok" in out.splitlines(), out[-3000:]


def test_two_processes_equal_one(tmp_path):
    """main.py in two JAX processes on localhost (one CPU device each, data-parallel mesh 2x1x1): each
    reads its own rows of every global batch; the adapter equals the single-process run's."""
    run_main(tmp_path / "one", *SHORT)
    ref = read_adapter(tmp_path / "one")
    for attempt in range(FULL_RUNS):
        workdir, port = tmp_path / f"two{attempt}", _free_port()
        procs = []
        for i in range(2):
            env = dict(ENV, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
            cmd = main_cmd(workdir, *SHORT, "--config.mesh.shape=(2,1,1)")
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            )
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, f"run {attempt + 1} of {FULL_RUNS}: {err[-3000:]}"
        assert len([f for f in os.listdir(workdir) if f.startswith("events.out")]) == 1  # process 0 alone writes
        ours = read_adapter(workdir)
        assert max(float(np.abs(ours[k] - ref[k]).max()) for k in ref) <= 1e-5
        shutil.rmtree(workdir)


def test_changed_upstream_file_rebuilds_the_prepared_dataset(tmp_path, caplog):
    manual = samples.write_sample_manual_dir("cocohd", tmp_path / "manual")
    src = data_sources("cocohd", manual, str(tmp_path / "tfds"))
    n_before = len(src["train"]) + len(src["test"])
    # Untouched: reused (the files tfds wrote keep their mtimes).
    info = tmp_path / "tfds" / "cocohd" / "1.0.0" / "dataset_info.json"
    stamp = info.stat().st_mtime_ns
    data_sources("cocohd", manual, str(tmp_path / "tfds"))
    assert info.stat().st_mtime_ns == stamp
    # One record fewer in the upstream file: rebuilt, and the log names the file.
    path = tmp_path / "manual" / "cocohd.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    with caplog.at_level("WARNING"):
        src = data_sources("cocohd", manual, str(tmp_path / "tfds"))
    assert len(src["train"]) + len(src["test"]) == n_before - 1
    assert "cocohd.jsonl changed" in caplog.text
    # A broken upstream file is an error now, not a silently reused old dataset.
    path.write_text("{broken\n")
    with pytest.raises(DataError, match="cocohd.jsonl:1: malformed JSON line"):
        data_sources("cocohd", manual, str(tmp_path / "tfds"))


def test_resume_after_the_upstream_file_changed_is_refused_naming_it(tmp_path):
    manual = samples.write_sample_manual_dir("cocohd", tmp_path / "manual")
    args = (*SHORT, "--config.data.use_bundled_samples=False", f"--config.data.manual_dir={manual}")
    run_main(tmp_path / "w", *args)
    time.sleep(0.01)
    (tmp_path / "manual" / "cocohd.jsonl").write_text((tmp_path / "manual" / "cocohd.jsonl").read_text() + "\n")
    proc = subprocess.run(main_cmd(tmp_path / "w", *args), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data.manual_dir: cocohd.jsonl changed" in proc.stderr
    # Allowed on purpose: the run resumes (finished already, so it only re-exports) on the new data.
    run_main(tmp_path / "w", *args, "--config.train.allow_changed_on_resume=('data_source',)")


def _llavacot_dir(d, image_bytes: bytes, name="images/0.png"):
    samples.write_sample_manual_dir("llavacot", d)
    (d / name).write_bytes(image_bytes)
    return str(d)


@pytest.mark.parametrize(
    "content", [b"<!DOCTYPE html><html><body>404 Not Found</body></html>", bytes(range(256)) * 4, b""]
)
def test_undecodable_image_is_an_error_naming_file_and_row(tmp_path, content):
    manual = _llavacot_dir(tmp_path / "m", content)
    with pytest.raises(DataError, match=r"train.jsonl:1: image .*images/0.png: not a decodable image"):
        data_sources("llavacot", manual, str(tmp_path / "t"))


def test_undecodable_image_can_be_dropped_and_counted(tmp_path):
    manual = _llavacot_dir(tmp_path / "m", b"<html>not an image</html>")
    builder = prepare("llavacot", manual, str(tmp_path / "t"), bad_images="drop")
    assert builder.info.metadata["dropped_bad_images"] == 1
    assert sum(len(s) for s in builder.as_data_source().values()) == 7  # of 8 sample rows


def test_image_file_name_that_is_not_a_string_is_a_data_error(tmp_path):
    manual = tmp_path / "m"
    samples.write_sample_manual_dir("llavacot", manual)
    rows = [json.loads(line) for line in (manual / "train.jsonl").read_text().splitlines()]
    rows[2]["image"] = 7
    (manual / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="train.jsonl:3: image file name must be a non-empty string, got 7"):
        data_sources("llavacot", str(manual), str(tmp_path / "t"))


def test_truncated_safetensors_names_the_file(tmp_path):
    from lora_jax.errors import CheckpointError
    from lora_jax.io.safetensors_file import SafetensorsFile, write_safetensors

    path = tmp_path / "model.safetensors"
    write_safetensors(str(path), [("w", (64, 64), np.float32)], lambda _: np.ones((64, 64)))
    assert SafetensorsFile(str(path)).read("w", slice(0, 2)).shape == (2, 64)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{path}: unreadable safetensors file"):
        SafetensorsFile(str(path))


def test_failed_adapter_write_removes_the_temporary_and_keeps_the_old_adapter(tmp_path, monkeypatch):
    """A full disk during export: the error names the path, adapter.tmp is gone, adapter/ is the old one."""
    import jax
    from flax import nnx

    from lora_jax.errors import WorkdirError
    from lora_jax.lora.spec import LoraSpec
    from lora_jax.model.transformer import Transformer
    from lora_jax.train import trainer
    from lora_jax.train.trainer import export_adapter
    from tests.tiny_model import TINY

    model = Transformer(TINY, LoraSpec(targets=("o_proj",), rank=2), rngs=nnx.Rngs(0))
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    export_adapter(graphdef, lora, frozen, tmp_path, "base")
    old = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()

    def disk_full(model, out_dir, base):
        os.makedirs(out_dir, exist_ok=True)
        (tmp_path / "adapter.tmp" / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer, "export_peft", disk_full)
    lora = jax.tree.map(lambda x: x + 1, lora)
    with pytest.raises(WorkdirError, match=r"adapter.tmp: writing the adapter failed \(No space left on device\)"):
        export_adapter(graphdef, lora, frozen, tmp_path, "base")
    assert not (tmp_path / "adapter.tmp").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == old
