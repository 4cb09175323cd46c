"""Divergence stops a run (lora_jax/divergence.py): the detector on made-up histories, a run whose
learning rate passes validation but which diverges, and a joint run where one arm diverges alone.
Also the step timer's arithmetic (evaluation time is not training time)."""

import json
import math
import subprocess

import numpy as np
import pytest

from lora_jax.run.train_loop import StepTimer
from lora_jax.train.divergence import DivergenceDetector, DivergenceLimits
from tests.cli import ENV, ROOT, main_cmd

DEFAULT = DivergenceLimits()  # the defaults of configs/base.py (checked below)
# Measured (tests' runlocal arm, one check per step): (loss, adapter norm / initial norm).
HEALTHY = [(5.566, 1), (5.567, 1.01), (5.48, 1.11), (5.319, 1.25), (5.294, 1.4), (5.282, 1.54), (5.278, 1.68)]
HEALTHY += [(5.276, 1.79), (5.283, 1.89), (5.277, 1.97), (5.273, 2.04), (5.281, 2.09), (5.269, 2.22)]
# --config.optim.learning_rate=1e30: the loss sits at ln(vocab) while lora_B explodes.
LR_1E30 = [(5.566, 1), (5.567, 6.64e30), (5.557, 1.69e31), (5.557, 2.53e31)]


def run(history, limits=DEFAULT, initial=2.0):
    detector = DivergenceDetector(limits, initial)
    for step, (loss, growth) in enumerate(history, start=1):
        found = detector.check(step, loss, growth * initial)
        if found:
            return found
    return None


def test_defaults_are_the_config_keys():
    from configs import base

    assert DivergenceLimits.from_config(base.get_config()) == DEFAULT


def test_detector_on_made_up_histories():
    assert run(HEALTHY) is None
    found = run(LR_1E30)
    assert (found.step, found.rule) == (2, "norm_growth") and found.value == pytest.approx(2 * 6.64e30)
    assert "adapter norm 1.33e+31 is 6.64e+30x its initial 2" in found.detail
    assert "train.divergence.max_norm_growth=20" in found.detail
    assert run(LR_1E30, DivergenceLimits(max_norm_growth=0)) is None  # 0 = off: the loss alone misses it
    # The loss rule: `patience` consecutive checks above the running minimum + max_loss_rise.
    rising = [(3.0, 1), (2.0, 1), (1.5, 1), (2.6, 1), (2.7, 1), (2.8, 1), (2.9, 1)]
    found = run(rising)
    assert (found.step, found.rule, found.value) == (6, "loss_rise", 2.8)
    assert "stayed more than 1 above its minimum 1.5000 for 3 checks" in found.detail
    spikes = [(3.0, 1), (1.5, 1), (2.6, 1), (2.7, 1), (1.6, 1), (2.9, 1), (2.9, 1), (1.7, 1)]
    assert run(spikes) is None  # never 3 in a row
    assert run(rising, DivergenceLimits(patience=4)).step == 7
    assert run(rising, DivergenceLimits(patience=5)) is None
    # Non-finite values stop at once, whatever the limits.
    off = DivergenceLimits(max_loss_rise=0, max_norm_growth=0)
    for history, what in [([(5.0, 1), (math.nan, 1)], "non-finite loss nan"), ([(5.0, math.inf)], "adapter norm inf")]:
        found = run(history, off)
        assert found.rule == "non_finite" and what in found.detail
        assert json.loads(json.dumps(found.to_json()))["value"] in ("nan", "inf")


def test_step_timer_leaves_out_paused_time():
    """A fake clock: 2 s per step, a 100 s evaluation after step 3 (inside paused()). The reading after
    step 5 is 2 s per step; counting the evaluation it would be (4 * 2 + 100) / 4 = 27 s."""
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])
    for step in range(1, 6):
        now[0] += 2.0  # the step
        timer.tick({})
        if step == 3:
            with timer.paused():
                now[0] += 100.0  # the evaluation
    assert timer.step_s() == pytest.approx(2.0)
    now[0] += 3.0
    timer.tick({})
    assert timer.step_s() == pytest.approx(3.0)  # a new window starts at each reading
    assert timer.step_s() is None


# The runs below train the medmcqa arms on rows of 256 tokens (one bundled example each): a step costs a
# quarter of the default runlocal arm's 1024-token rows, and divergence does not depend on the data.
SHORT_ROWS = ("--config.data.max_seq_len=256", "--config.data.max_target_tokens=64")
# learning rate 1.0 without clipping (valid: only > 0 is required; 1e30 was the case).
IN_RANGE_LR = ("--config.optim.learning_rate=1.0", "--config.optim.grad_clip_norm=0")
RUNS = {
    "single": (
        "configs/medmcqa_oproj_fc2.py:runlocal",
        (*IN_RANGE_LR, "--config.train.checkpoint_every_steps=2", "--config.eval.evaluators=('loss',)"),
    ),
    "joint": (
        "configs/medmcqa_all_arms.py:runlocal",
        (
            "--config.arms=('oproj','fc2')",
            *IN_RANGE_LR,
            "--config.lora.alpha_overrides.o_proj=1e-12",
            "--config.train.total_steps=6",
            "--config.train.checkpoint_every_steps=2",
            "--config.eval.evaluators=('loss',)",
            "--config.eval.max_eval_batches=1",
        ),
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The module's main.py runs (RUNS), started together: each is mostly a one-core start-up (imports,
    data preparation) that would leave the other core idle. Returns wait(name) -> (CompletedProcess,
    its workdir)."""
    started = {}
    for name, (config, overrides) in RUNS.items():
        out = tmp_path_factory.mktemp(name)
        streams = open(out / "stdout", "w"), open(out / "stderr", "w")  # files: a full pipe would block a run
        cmd = main_cmd(out / "workdir", *SHORT_ROWS, *overrides, config=config)
        started[name] = (
            cmd,
            out,
            streams,
            subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=streams[0], stderr=streams[1]),
        )

    def wait(name):
        cmd, out, streams, proc = started[name]
        returncode = proc.wait(timeout=600)
        for stream in streams:
            stream.close()
        stdout, stderr = ((out / f).read_text() for f in ("stdout", "stderr"))
        return subprocess.CompletedProcess(cmd, returncode, stdout, stderr), out / "workdir"

    yield wait
    for _, _, streams, proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in streams:
            stream.close()


def test_run_with_a_learning_rate_in_range_that_diverges_stops_keeping_the_last_checkpoint(runs):
    """learning rate 1.0 without clipping (valid: only > 0 is required; 1e30 was the issue's case): the
    adapters grow about 29x in 4 steps (the healthy runlocal arm: 2.2x in 20). Checked at each log step (2)."""
    proc, workdir = runs("single")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["divergence"]["rule"] == "norm_growth"
    step, last = summary["divergence"]["step"], summary["last_checkpoint_step"]
    assert errors[0].startswith(f"error: training diverged at step {step}: adapter norm ")
    assert errors[0].endswith(
        f"stopped without exporting an adapter, the last checkpoint is {workdir / 'checkpoints' / str(last)}"
    )
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert steps == list(range(2, step, 2)) and last == steps[-1]  # every save before the detection is kept
    assert not (workdir / "adapter").exists() and not (workdir / "eval").exists()
    assert summary["divergence"]["value"] > summary["divergence"]["limit"] > 0


def test_joint_run_one_arm_diverges_alone(runs):
    """learning rate 1.0 without clipping: arm fc2's adapters grow past 20x (as in the run above) and it
    stops at a check; arm oproj, whose tiny alpha (1e-12) leaves its gradients far below Adam's epsilon
    so that it barely moves, trains on to the end, is evaluated and exported."""
    proc, workdir = runs("joint")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fc2, oproj = workdir / "medmcqa_fc2_s0", workdir / "medmcqa_oproj_s0"
    bad = json.loads((fc2 / "summary.json").read_text())
    assert bad["status"] == "diverged" and bad["divergence"]["rule"] == "norm_growth", bad
    step = bad["divergence"]["step"]
    assert step < 6 and f"arm fc2: training diverged at step {step}: adapter norm" in proc.stdout
    assert not (fc2 / "adapter").exists() and not (fc2 / "eval").exists()
    assert sorted(int(p.name) for p in (fc2 / "checkpoints").iterdir()) == list(range(2, step, 2))
    good = json.loads((oproj / "summary.json").read_text())
    assert good["status"] == "done" and good["final_step"] == 6 and np.isfinite(good["eval_loss"])
    assert [s for s, _ in good["train_loss_history"]] == [2, 4, 6]  # it went on after fc2 stopped
    assert sorted(p.name for p in (oproj / "checkpoints").iterdir()) == ["2", "4", "6"]
    from safetensors.numpy import load_file

    weights = load_file(str(oproj / "adapter" / "adapter_model.safetensors"))
    assert weights and all(np.isfinite(w).all() for w in weights.values())
    assert json.loads((workdir / "joint" / "summary.json").read_text())["diverged"] == ["fc2"]
