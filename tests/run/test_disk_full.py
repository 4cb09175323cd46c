"""A full disk while a checkpoint is written, on a real small file system: a tmpfs mounted in a
private mount namespace (`unshare -m`, as root). Orbax writes through tensorstore's own file I/O, so
patching Python's file calls would not reach it; where the mount cannot be made, the test skips and
says why."""

import os
import shlex
import shutil
import subprocess

import pytest

from tests.cli import ENV, ROOT, main_cmd


def _tmpfs_reason(probe_dir) -> str:
    """'' when a tmpfs can be mounted in a private mount namespace here, else why not."""
    if shutil.which("unshare") is None:
        return "no `unshare` command"
    if os.geteuid() != 0:
        return "not root: mounting a tmpfs in a private mount namespace needs root"
    os.makedirs(probe_dir, exist_ok=True)
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe_dir} && touch {probe_dir}/x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "" if proc.returncode == 0 else f"cannot mount a tmpfs in a private namespace: {proc.stderr.strip()}"


def test_full_disk_during_a_checkpoint_is_one_error_line(tmp_path):
    """The run saves every step on a 16 MiB tmpfs; once step 1's checkpoint is finished a file fills the
    disk, so a later checkpoint write fails: exit 2, one `error:` line naming the workdir and the OS
    error, the finished checkpoint intact and no partial step directory."""
    reason = _tmpfs_reason(tmp_path / "probe")
    if reason:
        pytest.skip(f"full-disk test SKIPPED: {reason}")
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    cmd = main_cmd(  # the medmcqa arm on 256-token rows: a step costs a quarter of the default arm's
        work,
        "--config.data.max_seq_len=256",
        "--config.data.max_target_tokens=64",
        "--config.train.total_steps=4",
        "--config.train.checkpoint_every_steps=1",
        "--config.train.log_every_steps=1",
        "--config.eval.evaluators=('loss',)",
        config="configs/medmcqa_oproj_fc2.py:runlocal",
    )
    # Inside the namespace: mount, start the filler (waits for a finished checkpoint 1, then fills the
    # disk), run main.py, then copy what is left out of the tmpfs before the namespace goes away.
    script = f"""
mount -t tmpfs -o size=16m tmpfs {work} || exit 99
( while [ ! -d {work}/checkpoints/1 ] && [ ! -f {out}/rc ]; do sleep 0.05; done; dd if=/dev/zero of={work}/filler bs=64k 2>/dev/null ) &
{shlex.join(cmd)} >{out}/stdout 2>{out}/stderr
echo $? >{out}/rc
wait
ls -A {work}/checkpoints >{out}/checkpoints
ls -A {work}/checkpoints/1 {work}/checkpoints/1/state >{out}/step1
ls -A {work} >{out}/workdir
"""
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, env=ENV, timeout=600)
    assert proc.returncode == 0, (out / "stderr").read_text()[-3000:] if (out / "stderr").exists() else proc
    rc, stderr = int((out / "rc").read_text()), (out / "stderr").read_text()
    assert rc == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert errors[0].startswith(f"error: {work}: writing checkpoint step ")
    assert "failed (No space left on device)" in errors[0] and "the last finished checkpoint is step" in errors[0]
    failed = int(errors[0].split("writing checkpoint step ")[1].split()[0])
    steps = (out / "checkpoints").read_text().split()
    assert all(s.isdigit() for s in steps), steps  # no <step>.orbax-checkpoint-tmp left behind
    assert "1" in steps and all(int(s) < failed for s in steps), (steps, failed)
    assert {"commit_success.txt", "manifest.ocdbt"} <= set((out / "step1").read_text().split())
    assert "adapter" not in (out / "workdir").read_text().split()


def test_a_failed_orbax_write_ends_its_sibling_writes_before_raising(monkeypatch):
    """The mechanism behind a traceback after the error line, without a tmpfs: orbax runs a save's
    writes as tasks of one event loop (`asyncio_utils.run_sync`); one write fails while a sibling
    tensorstore write is still in flight. The failure must reach the caller only after the sibling has
    ended, so that the sibling's completion never calls into a closed loop ("RuntimeError: Event loop
    is closed" through sys.unraisablehook)."""
    import asyncio
    import sys
    import threading
    import time

    import tensorstore as ts
    from orbax.checkpoint._src import asyncio_utils

    import lora_jax.io.checkpoints  # noqa: F401 — installs the draining event-loop runner

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_value))
    promise, write = ts.Promise.new()  # a tensorstore write that finishes 0.2 s later, on another thread
    threading.Timer(0.2, promise.set_result, (None,)).start()
    sibling_done = []

    async def sibling():
        await write
        sibling_done.append(True)

    async def failing():
        await asyncio.sleep(0.01)
        raise ValueError("No space left on device [os_error_code='28']")

    async def save():
        await asyncio.gather(failing(), sibling())

    with pytest.raises(ValueError, match="No space left"):
        asyncio_utils.run_sync(save())
    raised_with_sibling_done = bool(sibling_done)
    time.sleep(0.4)  # past the sibling's completion
    assert not unraisable, unraisable
    assert raised_with_sibling_done
