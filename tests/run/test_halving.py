"""Successive halving over a joint run's arms (train.halving): the rung decision, the record a resumed
run replays, the config checks, the step-0 proxy's definition, the report's agreement figures — and
one halving run end to end: the arm left trains exactly as its own run, a pruned arm keeps its
checkpoint and results, and a kill between a rung's decision and the next step resumes to the same
adapters."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy import stats

from configs import base
from eval import report
from eval.early_selection import agreement
from lora_jax.errors import ConfigError, WorkdirError
from lora_jax.run.config import validate
from lora_jax.run.halving import HalvingPlan, HalvingRecord, decide, proxy_scores
from tests.cli import run_main_ok

# --- the decision -------------------------------------------------------------------------------


def test_the_best_n_over_eta_go_on_in_either_direction():
    scores = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 0.5, "e": 4.0, "f": 2.5}
    assert decide(scores, 3, higher_is_better=False) == (["b", "d"], ["a", "c", "e", "f"])
    assert decide(scores, 3, higher_is_better=True) == (["a", "e"], ["b", "c", "d", "f"])
    assert decide(scores, 2, higher_is_better=True) == (["a", "e", "f"], ["b", "c", "d"])


def test_at_least_one_arm_goes_on_ties_go_to_the_lower_loss_then_the_earlier_and_nan_ranks_last():
    assert decide({"a": 1.0, "b": 2.0}, 3, higher_is_better=True) == (["b"], ["a"])
    assert decide({"a": 1.0, "b": 1.0, "c": 1.0}, 3, higher_is_better=True) == (["a"], ["b", "c"])
    tied = {"a": 0.5, "b": 0.5, "c": 0.5}
    assert decide(tied, 3, higher_is_better=True, tiebreak={"a": 2.0, "b": 1.0, "c": 1.5}) == (["b"], ["a", "c"])
    assert decide({"a": float("nan"), "b": 5.0, "c": float("inf")}, 3, higher_is_better=False) == (["b"], ["a", "c"])


# --- the config checks and the record -----------------------------------------------------------


def _joint(**halving):
    config = base.arm_config("cocohd", "oproj", "runlocal")
    config.arms = ("oproj", "fc2", "qkv")
    for k, v in halving.items():
        config.train.halving[k] = v
    return config


@pytest.mark.parametrize(
    "change,message",
    [
        ({"rungs": (0.5, 0.25)}, r"rungs=\(0.5, 0.25\) must be increasing fractions"),
        ({"rungs": (0.01,)}, "strictly between 0 and 20"),
        ({"rungs": (0.5, 1.0)}, "strictly between 0 and 20"),
        ({"rungs": (0.5,), "eta": 1}, "eta=1 must be an integer >= 2"),
        ({"rungs": (0.5,), "metric": "accuracy"}, "metric='accuracy' is unknown; valid: loss, score"),
        ({"proxy_batches": -1}, "proxy_batches=-1 must be >= 0"),
    ],
)
def test_halving_settings_are_checked_before_anything_runs(change, message):
    with pytest.raises(ConfigError, match=message):
        validate(_joint(**change))


def test_halving_needs_a_joint_run_and_a_score_needs_the_suite():
    config = base.arm_config("cocohd", "oproj", "runlocal")
    config.train.halving.rungs = (0.5,)
    with pytest.raises(ConfigError, match="among the arms of a joint run"):
        validate(config)
    config = _joint(rungs=(0.5,), metric="score")
    config.eval.evaluators = ("loss",)
    with pytest.raises(ConfigError, match='eval.evaluators must include "generate"'):
        validate(config)


def test_the_record_is_replayed_only_with_its_own_settings(tmp_path):
    plan = HalvingPlan.from_config(_joint(rungs=(0.25, 0.5), eta=2))
    assert plan.steps == (5, 10)
    record = HalvingRecord(tmp_path, plan)
    record.add({"step": 5, "scores": {"oproj": 1.0}, "kept": ["oproj"], "pruned": ["fc2"], "dropped": {"qkv": 2}})
    again = HalvingRecord(tmp_path, plan)
    assert again.decided(5) and not again.decided(10)
    assert again.pruned() == {"fc2": 5} and again.gone() == {"fc2", "qkv"}  # qkv diverged at step 2
    assert again.arm_steps(["oproj", "fc2", "qkv"], 20) == 20 + 5 + 2
    again.check_resume(10)  # the rung at 5 is decided; the one at 10 comes next
    with pytest.raises(WorkdirError, match="no decision recorded for the rung at step 10, resumed at 15"):
        again.check_resume(15)
    other = HalvingPlan.from_config(_joint(rungs=(0.25, 0.5), eta=3))
    with pytest.raises(WorkdirError, match="decided with train.halving"):
        HalvingRecord(tmp_path, other)


def test_the_proxy_is_the_mean_gradient_norm_per_root_parameter():
    norms = np.array([[2.0, 9.0], [4.0, 3.0]])  # [batches, arms]
    np.testing.assert_allclose(proxy_scores(norms, [4, 9]), [3.0 / 2.0, 6.0 / 3.0])


def test_agreement_counts_pairs_and_takes_spearman_from_scipy():
    full = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    assert agreement(full, dict(full)) == (1.0, 1.0, 4)
    reversed_ = {a: -v for a, v in full.items()}
    assert agreement(full, reversed_) == (0.0, -1.0, 4)
    # one pair swapped (c, d) and a tie (a = b: left out of the pairs): 4 of the 5 other pairs agree
    other = {"a": 5.0, "b": 5.0, "c": 1.0, "d": 2.0, "x": 9.0}  # x: not in the full ablation
    pairs, rho, n = agreement(full, other)
    assert (pairs, n) == (4 / 5, 4)
    assert rho == pytest.approx(stats.spearmanr([4, 3, 2, 1], [5, 5, 1, 2]).statistic)


# --- one halving run, end to end ----------------------------------------------------------------

JOINT = "configs/cocohd_all_arms.py:runlocal"
HALVING = (
    "--config.arms=('oproj_fc2','oproj@lp=0.25','qkv')",  # a variant of other settings leaves the bank too
    "--config.train.halving.rungs=(0.25,)",  # step 5 of 20; eta 3: one arm goes on
    "--config.eval.evaluators=('loss',)",
)


def _adapter(d):
    return load_file(str(d / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def halving_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("halving") / "run"
    out = run_main_ok(root, *HALVING, config=JOINT).stdout
    return root, out


def test_the_arm_left_trains_as_its_own_run_and_the_pruned_keep_their_rung(halving_run, reference_run):
    """The reference run is oproj_fc2 trained alone; the halving run keeps it at the rung (the lowest
    test loss of the three), so removing the others and rebuilding the program must change nothing."""
    root, stdout = halving_run
    record = json.loads((root / "joint/halving.json").read_text())
    (rung,) = record["rungs"]
    assert rung["step"] == 5 and rung["kept"] == ["oproj_fc2"] and sorted(rung["pruned"]) == ["oproj@lp=0.25", "qkv"]
    assert min(rung["scores"], key=rung["scores"].get) == "oproj_fc2" and rung["higher_is_better"] is False
    survivor, ref_dir = root / "cocohd_oproj_fc2_s0", reference_run[0]
    a, b = _adapter(ref_dir), _adapter(survivor)
    assert a.keys() == b.keys() and max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5
    ours = json.loads((survivor / "summary.json").read_text())
    ours_loss, ref_loss = dict(ours["train_loss_history"]), dict(reference_run[1]["train_loss_history"])
    assert set(ours_loss) == set(ref_loss) | {5}  # the rung logs too
    assert all(ours_loss[step] == pytest.approx(v, rel=1e-5) for step, v in ref_loss.items())
    assert ours["status"] == "done" and ours["halving"]["steps"] == [5]
    for arm in ("oproj@lp=0.25", "qkv"):
        d = root / f"cocohd_{arm}_s0"
        s = json.loads((d / "summary.json").read_text())
        assert s["status"] == "pruned" and s["pruned_at"] == 5 and s["eval_loss"] == rung["scores"][arm]
        assert s["rung"]["rank"] in (2, 3) and not (d / "adapter").exists()
        assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["5"]
    joint = json.loads((root / "joint/summary.json").read_text())
    assert joint["halving"]["selected"] == ["oproj_fc2"] and joint["cost"]["arm_steps"] == 20 + 5 + 5
    proxy = json.loads((root / "joint/step0_proxy.json").read_text())
    assert sorted(proxy["ranking"]) == ["oproj@lp=0.25", "oproj_fc2", "qkv"] and proxy["batches"] == 4
    assert joint["cost"]["proxy_arm_steps"] == 3 * 4
    assert "halving at step 5 (eval_loss)" in stdout and "pruned at step 5" in stdout
    # the report keeps the arms out of the study's table and shows the run under Early selection
    built = report.build(str(root), str(root / "report"))
    assert built["rows"] == [] and [r.winner for r in built["early_selection"]] == ["oproj_fc2"]
    assert "## Early selection: cocohd" in (root / "report/report.md").read_text()


def test_a_kill_between_the_decision_and_the_next_step_resumes_the_decision(halving_run, tmp_path):
    """As if killed right after halving.json was written: the pruned arms stay out (their summaries are
    not rewritten), the arm left resumes from the rung and ends with the same adapter."""
    root = tmp_path / "run"
    shutil.copytree(halving_run[0], root)
    survivor = root / "cocohd_oproj_fc2_s0"
    before = _adapter(survivor)
    for step in ("10", "20"):
        shutil.rmtree(survivor / "checkpoints" / step)
    shutil.rmtree(survivor / "adapter")
    for path in (survivor / "summary.json", root / "joint/summary.json", root / "report"):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    pruned = {a: (root / f"cocohd_{a}_s0/summary.json").read_bytes() for a in ("oproj@lp=0.25", "qkv")}
    out = run_main_ok(root, *HALVING, config=JOINT).stdout
    assert "halving at step" not in out  # replayed, not decided again
    after = _adapter(survivor)
    assert max(float(np.abs(after[k] - before[k]).max()) for k in after) <= 1e-6
    assert json.loads((survivor / "summary.json").read_text())["resumed_from"] == 5
    assert {a: (root / f"cocohd_{a}_s0/summary.json").read_bytes() for a in pruned} == pruned
    joint = json.loads((root / "joint/summary.json").read_text())
    assert joint["halving"]["selected"] == ["oproj_fc2"] and joint["cost"]["arm_steps"] == 30


def test_a_kill_before_the_decision_was_recorded_decides_again_the_same_way(halving_run, tmp_path):
    """As if killed after every arm saved step 5 and before halving.json: the resumed run builds all
    three arms from step 5, decides the rung again from the same checkpoints, and ends the same."""
    root = tmp_path / "run"
    shutil.copytree(halving_run[0], root)
    survivor = root / "cocohd_oproj_fc2_s0"
    before, record = _adapter(survivor), (root / "joint/halving.json").read_text()
    for step in ("10", "20"):
        shutil.rmtree(survivor / "checkpoints" / step)
    shutil.rmtree(survivor / "adapter")
    for arm in ("oproj_fc2", "oproj@lp=0.25", "qkv"):
        (root / f"cocohd_{arm}_s0/summary.json").unlink()
    for path in (root / "joint/summary.json", root / "joint/halving.json", root / "report"):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out = run_main_ok(root, *HALVING, config=JOINT).stdout
    assert "halving at step 5" in out
    assert json.loads((root / "joint/halving.json").read_text()) == json.loads(record)
    after = _adapter(survivor)
    assert max(float(np.abs(after[k] - before[k]).max()) for k in after) <= 1e-6


def test_a_halving_workdir_resumed_without_halving_is_refused(halving_run, tmp_path):
    from lora_jax.run.train_loop import start_arms

    config = base.arm_config("cocohd", "all", "runlocal")
    config.arms = ("oproj_fc2", "oproj@lp=0.25", "qkv")
    root = tmp_path / "run"
    shutil.copytree(halving_run[0] / "joint", root / "joint")
    with pytest.raises(WorkdirError, match="holds a successive-halving run; resume it with its train.halving"):
        start_arms(config, str(root))
