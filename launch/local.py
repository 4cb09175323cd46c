"""Runs a sweep's runs one after another on this machine, under one root directory.

    python launch/local.py --sweep=configs/sweeps/study.py:dataset=cocohd --root=/data/sweeps/cocohd

A finished run (its workdir has summary.json) is skipped; an unfinished one resumes from its
latest checkpoint (main.py resumes by itself); a failed one is recorded and the sweep goes on. A
diverged run (its summary.json says "status": "diverged") is counted as diverged, not done, and is
skipped on a rerun too (rerunning would diverge again: change its config). Each run's output goes
to <root>/<name>/launch.log. The end is a table of every run's status and the study's report
(`python -m eval.report`, into <root>/report; --no_report skips it); the exit status is 1 if any run
failed or diverged. Re-running the same command finishes only what is left. A joint run (all arms of
a dataset in one job, `config.arms`) counts as done once its <name>/joint/summary.json is written.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.sweep import ROOT, Run, SweepError, load  # noqa: E402


def diverged(run_dir: str) -> str | None:
    """ "diverged at step N (rule, value)" when the run's summary.json records a divergence, else None."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    from eval.report import diverged_note  # the report's wording for the same run

    return diverged_note(summary)


def status_before(run_dir: str) -> str:
    """diverged (summary.json says so) | done (any other summary.json; a joint run's joint/summary.json)
    | resume (a finished checkpoint, of the run or of a joint run's arm: orbax renames <step>.*tmp* to
    <step>) | new."""
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return "diverged" if diverged(run_dir) else "done"
    if os.path.exists(os.path.join(run_dir, "joint", "summary.json")):
        return "done"
    arms = [os.path.join(run_dir, d) for d in sorted(os.listdir(run_dir))] if os.path.isdir(run_dir) else []
    for d in [run_dir] + arms:
        ckpts = os.path.join(d, "checkpoints")
        if os.path.isdir(ckpts) and any(name.isdigit() for name in os.listdir(ckpts)):
            return "resume"
    return "new"


def last_error(log_path: str) -> str:
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or ["(no output)"])[-1][:160]


def run_one(run: Run, root: str, python: str) -> tuple[str, float, str]:
    """(status, seconds, note) of one run: done | finished | resumed | failed | diverged."""
    run_dir = os.path.join(root, run.name)
    before = status_before(run_dir)
    if before == "done":
        return "done", 0.0, "already finished"
    if before == "diverged":
        return "diverged", 0.0, f"{diverged(run_dir)} (skipped; log: {os.path.join(run_dir, 'launch.log')})"
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "launch.log")
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"$ {run.shell(run_dir, python)}\n")
        log.flush()
        rc = subprocess.call(run.command(run_dir, python), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if note := diverged(run_dir):  # main.py exits 2 with one error line and writes summary.json
        return "diverged", seconds, f"{note} (log: {log_path})"
    if rc != 0:
        return "failed", seconds, f"exit {rc}: {last_error(log_path)} (log: {log_path})"
    return ("resumed" if before == "resume" else "finished"), seconds, ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sweep", required=True, help="<sweep file>.py[:options], e.g. configs/sweeps/study.py:dataset=cocohd"
    )
    p.add_argument("--root", required=True, help="directory holding one workdir per run")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs main.py")
    p.add_argument("--dry_run", action="store_true", help="print each run's command and status, run nothing")
    p.add_argument("--no_report", action="store_true", help="skip the report at the end")
    a = p.parse_args(argv)
    try:
        runs = load(a.sweep)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = os.path.abspath(a.root)
    if a.dry_run:
        for run in runs:
            print(
                f"[{status_before(os.path.join(root, run.name))}] {run.shell(os.path.join(root, run.name), a.python)}"
            )
        return 0
    rows = []
    for i, run in enumerate(runs, start=1):
        print(f"[{i}/{len(runs)}] {run.name} ...", flush=True)
        status, seconds, note = run_one(run, root, a.python)
        print(
            f"[{i}/{len(runs)}] {run.name}: {status}"
            + (f" ({seconds:.0f} s)" if seconds else "")
            + (f" — {note}" if note else ""),
            flush=True,
        )
        rows.append((run.name, status, seconds, note))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'run':<{width}}  {'status':<8}  {'time':>7}  note")
    for name, status, seconds, note in rows:
        print(f"{name:<{width}}  {status:<8}  {f'{seconds:.0f} s' if seconds else '-':>7}  {note}")
    counts = {s: sum(r[1] == s for r in rows) for s in ("done", "finished", "resumed", "failed", "diverged")}
    print(", ".join(f"{v} {k}" for k, v in counts.items()) + f" — root {root}")
    if not a.no_report:
        from eval import report

        built = report.build(root, os.path.join(root, "report"))
        print(f"report: {len(built['rows'])} rows -> {os.path.join(root, 'report', 'report.md')}", flush=True)
    return 1 if counts["failed"] or counts["diverged"] else 0


if __name__ == "__main__":
    sys.exit(main())
