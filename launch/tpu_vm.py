"""One arm on a GCP TPU VM (or a multi-host slice): create, copy, install, run on every worker, delete.

    python launch/tpu_vm.py --name=lora-cocohd --zone=us-central2-b --accelerator_type=v4-32 \\
      --runtime_version=tpu-ubuntu2204-base --config=configs/cocohd_oproj_fc2.py \\
      --workdir=gs://my-bucket/lora/cocohd_oproj_fc2 -- --config.model.hf_dir=/mnt/models/qwen2.5-7b

The lifecycle, each step one `gcloud` command (`--dry_run` prints them all and runs none):
  1. create the TPU VM (`--spot` for a spot VM);
  2. copy the project (the files git tracks, as one tarball, to every worker) — or, with
     `--git_url`, clone it there at this checkout's commit;
  3. install it on every worker (`pip install -e ".[tf]" "jax[tpu]"`);
  4. run main.py on every worker at once (`--worker=all`; JAX finds the other hosts itself), its
     logs streamed here; the workdir must be gs:// so that every host sees the same checkpoints;
  5. delete the VM — also when the run failed, unless `--keep`.
With `--watch` (spot VMs), a run that ends because the VM was preempted (its state is no longer
READY) is followed by delete -> create -> copy -> install -> the same command again, which resumes
from the last checkpoint in the gs:// workdir; at most `--max_restarts` times.
Bad input (no gcloud on PATH, an unknown config file or key, a local workdir) is one error line
before anything is created.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.sweep import ROOT, SweepError, unknown_config_keys  # noqa: E402

INSTALL = 'cd lora_jax && python3 -m venv .venv && .venv/bin/pip install -q -e ".[tf]" "jax[tpu]"'


class LaunchError(RuntimeError):
    pass


class Gcloud:
    """Runs (or, dry, prints) `gcloud compute tpus tpu-vm …` commands for one VM."""

    def __init__(self, name: str, zone: str, dry_run: bool, project: str | None = None):
        self.name, self.zone, self.dry_run = name, zone, dry_run
        self.common = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])

    def cmd(self, verb: str, *args: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *self.common]

    def run(self, verb: str, *args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
        command = self.cmd(verb, *args)
        print("$ " + shlex.join(command), flush=True)
        if self.dry_run:
            return subprocess.CompletedProcess(command, 0, stdout="READY\n" if capture else None)
        done = subprocess.run(command, text=True, capture_output=capture)
        if check and done.returncode != 0:
            raise LaunchError(f"`{shlex.join(command)}` failed with exit status {done.returncode}")
        return done

    def ssh_all(self, command: str, check: bool = True) -> int:
        return self.run("ssh", self.name, "--worker=all", f"--command={command}", check=check).returncode

    def state(self) -> str:
        done = self.run("describe", self.name, "--format=value(state)", check=False, capture=True)
        return (done.stdout or "").strip() if done.returncode == 0 else "MISSING"


def project_tarball(out_dir: str) -> str:
    """The files git tracks in this checkout, as lora_jax.tar.gz (no venv, no workdirs)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    path = os.path.join(out_dir, "lora_jax.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for f in filter(None, files):
            tar.add(os.path.join(ROOT, f.decode()), arcname=f.decode())
    return path


def check_inputs(a) -> None:
    """Every check that needs no cloud: fails before anything is created."""
    if not a.dry_run and shutil.which("gcloud") is None:
        raise LaunchError("gcloud is not on PATH (install the Google Cloud CLI and run `gcloud auth login`)")
    config_file = a.config.partition(":")[0]
    if not os.path.isfile(os.path.join(ROOT, config_file)):
        raise LaunchError(f"--config: no such config file: {config_file}")
    if not a.workdir.startswith("gs://"):
        raise LaunchError(f"--workdir={a.workdir}: every worker must see the same workdir; use a gs:// path")
    for flag in a.main_flags:
        key = flag.removeprefix("--").partition("=")[0]
        if key.startswith("config.") and unknown_config_keys([key.removeprefix("config.")]):
            raise LaunchError(f"{flag}: unknown config key {key} (configs/base.py lists every key)")


def main_command(a) -> str:
    flags = [f"--config={a.config}", f"--workdir={a.workdir}", *a.main_flags]
    return "cd lora_jax && .venv/bin/python main.py " + shlex.join(flags)


def bring_up(g: Gcloud, a, tarball: str | None) -> None:
    create = ["create", g.name, f"--accelerator-type={a.accelerator_type}", f"--version={a.runtime_version}"]
    g.run(*create, *(["--spot"] if a.spot else []))
    if a.git_url:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        g.ssh_all(f"git clone {shlex.quote(a.git_url)} lora_jax && cd lora_jax && git checkout {commit}")
    else:
        g.run("scp", tarball, f"{g.name}:~/lora_jax.tar.gz", "--worker=all")
        g.ssh_all("mkdir -p lora_jax && tar -xzf lora_jax.tar.gz -C lora_jax")
    g.ssh_all(INSTALL)


def launch(a) -> int:
    check_inputs(a)
    g = Gcloud(a.name, a.zone, a.dry_run, a.project)
    with tempfile.TemporaryDirectory() as tmp:
        tarball = None if a.git_url else (os.path.join(tmp, "lora_jax.tar.gz") if a.dry_run else project_tarball(tmp))
        restarts, rc = 0, 1
        try:
            bring_up(g, a, tarball)
            while True:
                rc = g.ssh_all(main_command(a), check=False)
                if rc == 0 or not a.watch or restarts >= a.max_restarts:
                    break
                state = g.state()
                if state == "READY":  # the VM is fine: the run itself failed; retrying would not help
                    break
                restarts += 1
                print(f"VM {a.name} is {state} (preempted?): recreating it, restart {restarts}/{a.max_restarts}")
                g.run("delete", g.name, "--quiet", check=False)
                bring_up(g, a, tarball)
        finally:
            if a.keep:
                print(f"--keep: VM {a.name} left running (delete: {shlex.join(g.cmd('delete', g.name, '--quiet'))})")
            else:
                g.run("delete", g.name, "--quiet", check=False)
    if rc != 0:
        print(f"error: main.py failed on {a.name} (exit status {rc}); checkpoints are in {a.workdir}", file=sys.stderr)
    return 0 if rc == 0 else 1


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--accelerator_type", required=True, help="e.g. v5litepod-16, v4-32")
    p.add_argument("--runtime_version", required=True, help="TPU software version, e.g. tpu-ubuntu2204-base")
    p.add_argument("--spot", action="store_true")
    p.add_argument("--watch", action="store_true", help="recreate a preempted VM and rerun (resumes)")
    p.add_argument("--max_restarts", type=int, default=10)
    p.add_argument("--keep", action="store_true", help="do not delete the VM at the end (or on failure)")
    p.add_argument("--git_url", default=None, help="clone this repository on the workers instead of copying")
    p.add_argument("--config", required=True, help="arm config file[:runlocal]")
    p.add_argument("--workdir", required=True, help="gs:// workdir shared by every worker")
    p.add_argument("--dry_run", action="store_true", help="print every gcloud command, run none")
    p.add_argument("main_flags", nargs="*", help="after --: more main.py flags (--config.<key>=…)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    try:
        return launch(a)
    except (LaunchError, SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
