"""Launchers: sweeps checked before launch, the local runner (skip / resume / fail and go on), and the
TPU VM lifecycle against a fake `gcloud` on PATH that records every call."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from launch import sweep
from tests.cli import ENV, ROOT

PY = sys.executable


# --- sweeps -------------------------------------------------------------------------------------


def test_study_sweep_is_the_study_grid():
    runs = sweep.load("configs/sweeps/study.py")
    assert len(runs) == 55 and len({r.name for r in runs}) == 55  # text: 9 + 9 + 9 + 7 + 6; images: 9 + 6
    assert len(sweep.load("configs/sweeps/study.py:dataset=cocohd")) == 9
    seeds = sweep.load("configs/sweeps/study.py:dataset=govreport,seeds=3")
    assert len(seeds) == 21 and {dict(r.overrides)["train.seed"] for r in seeds} == {0, 1, 2}
    r = sweep.load("configs/sweeps/study.py:dataset=cocohd,arms=oproj_fc2,runlocal,steps=4")[0]
    assert r.command("/r/cocohd_oproj_fc2_s0", "python") == [
        "python",
        "main.py",
        "--config=configs/cocohd_oproj_fc2.py:runlocal",
        "--workdir=/r/cocohd_oproj_fc2_s0",
        "--config.train.seed=0",
        "--config.train.total_steps=4",
    ]


def test_halving_sweeps_name_their_runs_and_settings():
    """The planted sweep's halving runs sit beside the full ones; the lr_targets sweep trains every arm
    at every setting as arm variants in one joint run per seed, each a config every check passes."""
    from configs import base
    from lora_jax.run.config import arm_configs

    runs = sweep.load("configs/sweeps/planted.py:planted=qkv+fc1,seeds=2,halving=1")
    assert [r.name for r in runs] == [
        "planted_qkv+fc1_s0",
        "planted_qkv+fc1_s0_halving",
        "planted_qkv+fc1_s1",
        "planted_qkv+fc1_s1_halving",
    ]
    halving = dict(runs[1].overrides)
    assert halving["train.halving.rungs"] == (0.2, 0.4) and halving["train.halving.metric"] == "score"
    assert "train.halving.rungs" not in dict(runs[0].overrides)
    (run,) = sweep.load("configs/sweeps/lr_targets.py:dataset=cocohd,arms=qkv+fc2,lp=1/8,lr=fc2:1/2")
    arms = dict(run.overrides)["arms"]
    assert arms == ("qkv", "qkv@lp=8", "fc2", "fc2@lr_fc2=2", "fc2@lp=8", "fc2@lp=8@lr_fc2=2")
    config = base.arm_config("cocohd", "all", "runlocal")
    for key, value in run.overrides:
        section, _, name = key.rpartition(".")
        node = config
        for part in section.split(".") if section else ():
            node = node[part]
        node[name] = value
    settings = {c.arm: (c.optim.loraplus_ratio, c.optim.lr_per_target.fc2) for c in arm_configs(config)}
    assert settings["fc2@lp=8@lr_fc2=2"] == (8.0, 2.0) and settings["qkv@lp=8"] == (8.0, 1.0)
    with pytest.raises(sweep.SweepError, match="give one of dataset"):
        sweep.load("configs/sweeps/lr_targets.py:lp=4")


def _sweep_file(tmp_path, runs):
    path = tmp_path / "my_sweep.py"
    path.write_text(f"def get_sweep(arg=None):\n    return {runs!r}\n")
    return str(path)


def test_sweep_overrides_name_keys_of_the_locked_base_config(tmp_path):
    """Overrides may name any field of configs/base.py's config, nested ones included (a section is a
    key too); the runs' commands carry them as --config.<key>= flags."""
    overrides = {"eval.latency.warmup": 3, "lora.rank_overrides.qkv": 4, "model.vision.kind": "clip"}
    runs = sweep.load(_sweep_file(tmp_path, [{"name": "a", "config": "configs/cocohd_qkv.py", "overrides": overrides}]))
    assert runs[0].args("/w")[2:] == [
        "--config.eval.latency.warmup=3",
        "--config.lora.rank_overrides.qkv=4",
        "--config.model.vision.kind=clip",
    ]
    assert sweep.unknown_config_keys(["train", "eval.suites.cocohd.metric", "eval.suites.squad", "lock"]) == [
        "eval.suites.squad",
        "lock",
    ]


@pytest.mark.parametrize(
    "runs, message",
    [
        (
            [{"name": "a", "config": "configs/nope.py", "overrides": {}}],
            "run 0 (a): no such config file: configs/nope.py",
        ),
        (
            [{"name": "a", "config": "configs/cocohd_qkv.py", "overrides": {"train.stepz": 3}}],
            "run 0 (a): unknown config key(s) train.stepz",
        ),
        (
            [
                {
                    "name": "a",
                    "config": "configs/cocohd_qkv.py",
                    "overrides": {"eval.latency.warmpu": 1, "train.items": 1},
                }
            ],
            "run 0 (a): unknown config key(s) eval.latency.warmpu, train.items",
        ),
        (
            [{"name": "a", "config": "configs/cocohd_qkv.py"}, {"name": "a", "config": "configs/cocohd_fc2.py"}],
            "run 1 (a): workdir name 'a' is also run 0's",
        ),
    ],
)
def test_bad_sweeps_fail_before_anything_runs(tmp_path, runs, message):
    spec = _sweep_file(tmp_path, runs)
    with pytest.raises(sweep.SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sweep.load(spec)
    proc = subprocess.run(
        [PY, "launch/local.py", f"--sweep={spec}", f"--root={tmp_path / 'root'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "root").exists()


# --- the local runner ---------------------------------------------------------------------------


def _local(spec, root, report=False):
    return subprocess.Popen(
        [PY, "launch/local.py", f"--sweep={spec}", f"--root={root}", *(() if report else ("--no_report",))],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_local_runner_skips_finished_resumes_unfinished_and_goes_on_after_a_failure(tmp_path):
    quick = {"train.total_steps": 6, "train.checkpoint_every_steps": 1, "eval.max_eval_batches": 1}
    runs = [
        {"name": n, "config": f"configs/cocohd_{n}.py", "config_arg": "runlocal", "overrides": quick}
        for n in ("qkv", "oproj", "fc2")
    ]
    spec, root = _sweep_file(tmp_path, runs), tmp_path / "root"
    proc = _local(spec, root)
    deadline = time.time() + 400
    ckpts = root / "oproj" / "checkpoints"
    while not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep dies mid-way through its second run
    proc.wait()
    assert (root / "qkv" / "summary.json").exists() and not (root / "oproj" / "summary.json").exists()

    out = _local(spec, root).communicate(timeout=600)[0]
    table = {
        line.split()[0]: line.split()[1]
        for line in out.splitlines()
        if line.split()[:1] in (["qkv"], ["oproj"], ["fc2"])
    }
    assert table == {"qkv": "done", "oproj": "resumed", "fc2": "finished"}, out
    assert all((root / n / "summary.json").exists() for n in ("qkv", "oproj", "fc2"))
    assert json.loads((root / "oproj" / "summary.json").read_text())["resumed_from"] >= 1

    out = _local(spec, root, report=True).communicate(timeout=600)[0]  # nothing left: no training at all
    assert "3 done, 0 finished, 0 resumed, 0 failed" in out
    assert f"report: 3 rows -> {root / 'report' / 'report.md'}" in out and (root / "report" / "cocohd.png").exists()

    from eval import report  # the study's table from the real runs' files

    built = report.build(str(root), str(tmp_path / "report"))
    rows = {r.arm: r for r in built["rows"]}
    assert set(rows) == {"qkv", "oproj", "fc2"} and built["missing"] == []
    for arm, row in rows.items():
        suite = json.loads((root / arm / "eval" / "cocohd.json").read_text())
        assert row.mean == pytest.approx(suite["score"]) and row.examples == suite["num_examples"]
        latency = json.loads((root / arm / "eval" / "latency.json").read_text())
        assert row.tpot_unmerged == pytest.approx(latency["variants"]["unmerged"]["tpot_ms_p95"])
    assert (tmp_path / "report" / "cocohd.png").exists()

    broken = runs + [
        {"name": "bad", "config": "configs/cocohd_qkv.py", "config_arg": "runlocal", "overrides": {"lora.rank": 0}}
    ]
    proc = _local(_sweep_file(tmp_path, broken), root)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 1 and "1 failed" in out and "lora.rank" in out  # recorded, with its error line


# --- TPU VMs, against a fake gcloud --------------------------------------------------------------

FAKE_GCLOUD = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys
    args = sys.argv[1:]
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
        f.write(json.dumps(args) + "\\n")
    if args[3] == "describe":
        print(os.environ.get("FAKE_GCLOUD_STATE", "READY"))
    if args[3] == "ssh" and any("main.py" in a for a in args):
        codes_file = os.environ["FAKE_GCLOUD_RUN_CODES"]
        codes = open(codes_file).read().split(",")
        open(codes_file, "w").write(",".join(codes[1:]) or "0")
        print("step 10/10  loss 1.0")
        sys.exit(int(codes[0]))
    """
)


@pytest.fixture
def fake_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=PY))
    (bin_dir / "gcloud").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(tmp_path / "calls.jsonl"))

    def run(*flags, codes="0", state="READY"):
        (tmp_path / "codes").write_text(codes)
        env.update(FAKE_GCLOUD_RUN_CODES=str(tmp_path / "codes"), FAKE_GCLOUD_STATE=state)
        base = [
            "--name=vm1",
            "--zone=us-central2-b",
            "--accelerator_type=v4-16",
            "--runtime_version=tpu-ubuntu2204-base",
        ]
        base += ["--config=configs/cocohd_oproj_fc2.py", "--workdir=gs://bucket/lora/run1"]
        proc = subprocess.run(
            [PY, "launch/tpu_vm.py", *base, *flags], cwd=ROOT, env=env, capture_output=True, text=True
        )
        log = tmp_path / "calls.jsonl"
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        if log.exists():
            log.unlink()
        return proc, calls

    return run


def _steps(calls):
    """Each call as verb (+ what its ssh command does)."""
    out = []
    for c in calls:
        assert c[:3] == ["compute", "tpus", "tpu-vm"] and "--zone=us-central2-b" in c
        verb = c[3]
        if verb == "ssh":
            command = next(a for a in c if a.startswith("--command="))
            verb += ":" + ("main" if "main.py" in command else "install" if "pip install" in command else "unpack")
            assert "--worker=all" in c
        out.append(verb)
    return out


LIFECYCLE = ["create", "scp", "ssh:unpack", "ssh:install", "ssh:main"]


def test_tpu_vm_lifecycle(fake_gcloud):
    proc, calls = fake_gcloud("--", "--config.lora.rank=32")
    assert proc.returncode == 0, proc.stderr
    assert _steps(calls) == LIFECYCLE + ["delete"]
    assert calls[0][4:7] == ["vm1", "--accelerator-type=v4-16", "--version=tpu-ubuntu2204-base"]
    main = next(a for a in calls[4] if a.startswith("--command="))
    assert main == (
        "--command=cd lora_jax && .venv/bin/python main.py --config=configs/cocohd_oproj_fc2.py "
        "--workdir=gs://bucket/lora/run1 --config.lora.rank=32"
    )
    assert "step 10/10" in proc.stdout  # the workers' logs are streamed


def test_tpu_vm_preemption_recreates_and_resumes(fake_gcloud):
    proc, calls = fake_gcloud("--spot", "--watch", codes="1,0", state="PREEMPTED")
    assert proc.returncode == 0, proc.stderr
    assert _steps(calls) == LIFECYCLE + ["describe", "delete"] + LIFECYCLE + ["delete"]
    assert all("--spot" in c for c in calls if c[3] == "create")
    mains = [c for c in calls if c[3] == "ssh" and any("main.py" in a for a in c)]
    assert mains[0] == mains[1]  # the same command: main.py resumes from the gs:// checkpoint


def test_tpu_vm_failed_run_still_deletes_unless_keep(fake_gcloud):
    proc, calls = fake_gcloud(codes="1")
    assert proc.returncode == 1 and _steps(calls) == LIFECYCLE + ["delete"]
    assert "main.py failed on vm1 (exit status 1)" in proc.stderr
    proc, calls = fake_gcloud("--keep", codes="1")
    assert proc.returncode == 1 and _steps(calls) == LIFECYCLE and "left running" in proc.stdout
    proc, calls = fake_gcloud("--watch", codes="1", state="READY")  # not preempted: no retry
    assert _steps(calls) == LIFECYCLE + ["describe", "delete"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--workdir=/tmp/local"], "use a gs:// path"),
        (["--config=configs/nope.py"], "no such config file: configs/nope.py"),
        (["--", "--config.lora.rnk=4"], "unknown config key config.lora.rnk"),
    ],
)
def test_tpu_vm_bad_input_creates_nothing(fake_gcloud, flags, message):
    proc, calls = fake_gcloud(*flags)
    assert proc.returncode == 2 and message in proc.stderr and calls == []


def test_tpu_vm_dry_run_prints_every_command(tmp_path):
    (tmp_path / "empty").mkdir()
    env = dict(os.environ, PATH=str(tmp_path / "empty"))  # no gcloud (nor anything else) on PATH
    flags = ["--name=vm1", "--zone=z", "--accelerator_type=v5litepod-16", "--runtime_version=v2-alpha-tpuv5-lite"]
    flags += ["--config=configs/cocohd_oproj_fc2.py", "--workdir=gs://b/w", "--spot", "--dry_run"]
    proc = subprocess.run([PY, "launch/tpu_vm.py", *flags], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("$ gcloud")]
    assert [line.split()[5] for line in lines] == ["create", "scp", "ssh", "ssh", "ssh", "delete"]
    assert "--spot" in lines[0]
    proc = subprocess.run([PY, "launch/tpu_vm.py", *flags[:-1]], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "gcloud is not on PATH" in proc.stderr


# --- XManager -----------------------------------------------------------------------------------


def test_xm_dry_run_prints_each_job_and_its_requirements(capsys):
    from launch import xm_launch

    rc = xm_launch.main(
        ["--sweep=configs/sweeps/study.py:dataset=cocohd,arms=qkv+oproj_fc2", "--root=gs://b/sweep"]
        + ["--executor=vertex", "--accelerator=tpu_v4", "--accelerator_count=8", "--dry_run"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert (
        "  python main.py --config=configs/cocohd_oproj_fc2.py --workdir=gs://b/sweep/cocohd_oproj_fc2_s0 --config.train.seed=0"
        in out
    )
    assert out.count("executor=vertex") == 2 and "tpu_v4=xm.Topology('8')" in out and "'jax[tpu]'" in out


def test_xm_launch_adds_one_work_unit_per_run(monkeypatch):
    from xmanager import xm_local, xm_mock

    from launch import xm_launch

    experiment = xm_mock.MockExperiment()
    titles = []
    monkeypatch.setattr(
        xm_local, "create_experiment", lambda experiment_title: titles.append(experiment_title) or experiment
    )
    rc = xm_launch.main(
        ["--sweep=configs/sweeps/study.py:dataset=govreport,arms=oproj+all,seeds=2", "--root=gs://b/gov"]
        + ["--executor=vertex", "--accelerator=a100", "--accelerator_count=4"]
    )
    assert rc == 0 and titles == ["gov"]
    jobs = experiment.launched_jobs
    assert [j.name for j in jobs] == [
        "govreport_oproj_s0",
        "govreport_oproj_s1",
        "govreport_all_s0",
        "govreport_all_s1",
    ]
    assert all(isinstance(j.executor, xm_local.Vertex) for j in jobs)
    assert "a100=4" in str(jobs[0].executor.requirements)
    assert list(jobs[1].args.to_list()) == [
        "--config=configs/govreport_oproj.py",
        "--workdir=gs://b/gov/govreport_oproj_s1",
        "--config.train.seed=1",
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--executor=vertex", "--root=/local/dir"], "need a gs:// root"),
        (
            ["--executor=vertex", "--root=gs://b/x", "--accelerator=tpu_v99"],
            "--accelerator=tpu_v99: not an XManager resource",
        ),
        (["--executor=slurm", "--root=/x"], "--executor=slurm: valid: local, vertex"),
    ],
)
def test_xm_bad_input_launches_nothing(flags, message, capsys):
    from launch import xm_launch

    assert xm_launch.main(["--sweep=configs/sweeps/study.py:dataset=cocohd", *flags]) == 2
    assert message in capsys.readouterr().err
