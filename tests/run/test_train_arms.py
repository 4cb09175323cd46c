"""Every arm of a dataset in one job (`config.arms`): each arm's outputs equal its own run's, a kill
between two arms' checkpoints resumes, the report reads the arms, and their adapters serve in one
batch (and adapters of different bases are refused)."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import base
from eval import report
from lora_jax.errors import ConfigError
from lora_jax.io.peft_adapter import BASE_FILE, with_adapter
from lora_jax.run.assemble import build_model
from lora_jax.run.config import arm_configs
from lora_jax.serve.bank import bank_from_adapters
from lora_jax.serve.generate import GenerationOptions, generate, left_pad
from lora_jax.sharding import make_mesh
from tests.cli import main_cmd

JOINT = "configs/cocohd_all_arms.py:runlocal"
ARMS = ("oproj_fc2", "oproj")
OVERRIDES = ("--config.arms=('oproj_fc2','oproj')", "--config.eval.evaluators=('loss','generate')")


def run_joint(root):
    import subprocess

    from tests.cli import ENV, ROOT

    proc = subprocess.run(
        main_cmd(root, *OVERRIDES, config=JOINT), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    return root, run_joint(root)


def arm_dir(root, arm):
    return root / f"cocohd_{arm}_s0"


def adapter(d):
    return load_file(str(d / "adapter" / "adapter_model.safetensors"))


def test_each_arm_writes_what_its_own_run_writes(joint, reference_run):
    """The reference run is configs/cocohd_oproj_fc2.py:runlocal trained alone (tests/conftest.py)."""
    root, stdout = joint
    ref_dir, ref = reference_run
    ours_dir = arm_dir(root, "oproj_fc2")
    ours = json.loads((ours_dir / "summary.json").read_text())
    a, b = adapter(ref_dir), adapter(ours_dir)
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5
    assert json.loads((ref_dir / "adapter/adapter_config.json").read_text()) == json.loads(
        (ours_dir / "adapter/adapter_config.json").read_text()
    )
    np.testing.assert_allclose(np.asarray(ours["train_loss_history"]), np.asarray(ref["train_loss_history"]), rtol=1e-5)
    assert ours["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    assert set(ours) - set(ref) == {"joint"}
    assert {k: ours[k] for k in ("arm", "targets", "rank", "trainable_params", "base_model")} == {
        k: ref[k] for k in ("arm", "targets", "rank", "trainable_params", "base_model")
    }
    # All arms decoded in one pass (per-row adapters) give the predictions of the arm decoding alone.
    ref_suite = json.loads((ref_dir / "eval/cocohd.json").read_text())
    our_suite = json.loads((ours_dir / "eval/cocohd.json").read_text())
    assert [e["prediction"] for e in our_suite["examples"]] == [e["prediction"] for e in ref_suite["examples"]]
    # Both arms have their own checkpoints, events and results; the shared data sits in joint/.
    for arm in ARMS:
        d = arm_dir(root, arm)
        assert sorted(p.name for p in (d / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]
        assert list(d.glob("events.out.tfevents.*")) and (d / "eval/cocohd.json").exists()
    assert (root / "joint/tfds").is_dir()
    assert "loss: oproj_fc2" in stdout and "report       python -m eval.report" in stdout


def event_scalars(workdir, tags) -> dict[str, dict[int, float]]:
    """The named TensorBoard scalars a workdir's events hold: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    ea = EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    ea.Reload()
    return {
        tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in ea.Tensors(tag)}
        for tag in set(tags) & set(ea.Tags()["tensors"])
    }


def test_each_arm_logs_what_its_own_run_logs_and_the_joint_speed(joint, reference_run):
    """One loop for one arm and K arms: arm oproj_fc2's events carry its own run's per-step scalars
    (adapter_norm, the batch's token counts, ...) with its own run's values; the speed of the step
    that trains every arm is named joint_*, never a single run's step_s / mfu / tokens_per_s."""
    root, _ = joint
    ref_dir, _ = reference_run
    per_step = ("loss", "grad_norm", "learning_rate", "adapter_norm", "target_tokens", "real_tokens")
    per_run = ("trainable_params", "train_dropped_examples")
    speeds = ("step_s", "mfu", "tokens_per_s", "real_tokens_per_s", "target_tokens_per_s")
    tags = per_step + per_run + speeds + tuple(f"joint_{s}" for s in speeds)
    ours, ref = event_scalars(arm_dir(root, "oproj_fc2"), tags), event_scalars(ref_dir, tags)
    for tag in per_step + per_run:
        assert ours[tag].keys() == ref[tag].keys() and len(ref[tag]) >= 2, tag
        for step, value in ref[tag].items():
            assert ours[tag][step] == pytest.approx(value, rel=1e-5), (tag, step)
    assert {f"joint_{s}" for s in speeds} <= ours.keys() and not set(speeds) & ours.keys()
    assert set(speeds) <= ref.keys() and not {f"joint_{s}" for s in speeds} & ref.keys()
    config = base.arm_config("cocohd", "oproj_fc2", "runlocal")
    tokens_per_step = config.train.global_batch_size * config.data.max_seq_len
    for step, s in ours["joint_step_s"].items():  # a joint step processes the batch once, for every arm
        assert ours["joint_tokens_per_s"][step] == pytest.approx(tokens_per_step / s, rel=1e-6)
        assert 0 < ours["joint_target_tokens_per_s"][step] < ours["joint_real_tokens_per_s"][step]
        assert 0 < ours["joint_mfu"][step] <= 1


def test_resume_after_a_kill_between_two_arms_saves(joint, tmp_path):
    """As if killed after arm oproj_fc2 saved step 20 and before arm oproj did: both resume from 10."""
    root = tmp_path / "joint"
    shutil.copytree(joint[0], root)
    before = {arm: adapter(arm_dir(root, arm)) for arm in ARMS}
    shutil.rmtree(arm_dir(root, "oproj") / "checkpoints" / "20")
    for arm in ARMS:
        shutil.rmtree(arm_dir(root, arm) / "adapter")
        (arm_dir(root, arm) / "summary.json").unlink()
    run_joint(root)
    for arm in ARMS:
        summary = json.loads((arm_dir(root, arm) / "summary.json").read_text())
        assert summary["resumed_from"] == 10
        after = adapter(arm_dir(root, arm))
        assert max(float(np.abs(after[k] - before[arm][k]).max()) for k in after) <= 1e-6


def test_report_reads_the_arms_as_runs(joint):
    results, missing = report.collect(str(joint[0]))
    assert sorted(r.arm for r in results) == sorted(ARMS) and missing == []


def test_trained_adapters_serve_in_one_batch(joint, tmp_path):
    root = joint[0]
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    config = base.arm_config("cocohd", "oproj_fc2", "runlocal")
    model, fingerprint = build_model(config, mesh)
    dirs = {arm: str(arm_dir(root, arm) / "adapter") for arm in ARMS}
    bank = bank_from_adapters(model, dirs, fingerprint)
    rng = np.random.default_rng(0)
    tokens, mask = left_pad([list(rng.integers(3, 250, size=n)) for n in (6, 4, 9)])
    opts = GenerationOptions(max_new_tokens=6)
    out, _ = generate(bank, tokens, mask, opts, adapter_ids=[1, 0, 1])
    for k, arm in enumerate(ARMS):
        alone_config = base.arm_config("cocohd", arm, "runlocal")
        alone = with_adapter(build_model(alone_config, mesh)[0], dirs[arm])
        want = generate(alone, tokens, mask, opts)[0]
        for row in [r for r, i in enumerate([1, 0, 1]) if i == k]:
            np.testing.assert_array_equal(out[row], want[row])
    other = tmp_path / "other_base"
    shutil.copytree(dirs["oproj"], other)
    (other / BASE_FILE).write_text(json.dumps({"base_model": "random-0000"}))
    with pytest.raises(ConfigError, match="different bases cannot share a batch"):
        bank_from_adapters(model, {"oproj_fc2": dirs["oproj_fc2"], "other": str(other)})
    with pytest.raises(ConfigError, match="not on the base served here"):
        bank_from_adapters(model, {"other": str(other)}, fingerprint)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"arms": ("oproj", "qkv_up")}, "config.arms has qkv_up; valid arms"),
        ({"arms": ("oproj", "oproj")}, "lists an arm twice"),
        ({"arms": ("oproj",), "mode": "eval"}, "mode=eval scores one arm"),
        ({"arms": ("oproj", "fc2"), "train.max_to_keep": 1}, "needs >= 2"),
    ],
)
def test_bad_joint_configs_are_refused(change, message):
    config = base.arm_config("cocohd", "all", "runlocal")
    for key, value in change.items():
        if "." in key:
            section, name = key.split(".")
            config[section][name] = value
        else:
            config[key] = value
    with pytest.raises(ConfigError, match=message):
        arm_configs(config)


def test_a_bad_arm_is_one_error_line(tmp_path):
    import subprocess

    from tests.cli import ENV, ROOT

    proc = subprocess.run(
        main_cmd(tmp_path, "--config.arms=('oproj','nope')", config=JOINT),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config.arms has nope; valid arms: qkv, oproj, fc1, fc2, oproj_fc1, qkv_fc1, oproj_fc2, qkv_fc2, all"
    ]
    assert not any(tmp_path.iterdir())  # nothing written
