"""A sweep on XManager: one experiment, one work unit per run, on the local executor or on Vertex AI.

    python launch/xm_launch.py --sweep=configs/sweeps/study.py:dataset=cocohd \\
      --root=gs://my-bucket/sweeps/cocohd --executor=vertex --accelerator=tpu_v4 --accelerator_count=8
    python launch/xm_launch.py --sweep=configs/sweeps/study.py:dataset=cocohd,runlocal --root=/tmp/sweep \\
      --executor=local --dry_run

Each work unit runs `python main.py --config=<arm> --workdir=<root>/<run name> <overrides>` in a
container built from this directory (`xm.python_container`; `--base_image` picks its image), with
the executor's requirements (`--accelerator=tpu_v4|tpu_v5e|a100|h100|… --accelerator_count=N`,
any XManager resource name). `--dry_run` prints each job's exact command and requirements and
creates nothing. xmanager is an extra of its own: `pip install -r requirements/launch.lock` after
the main stack (resolving it together with the main stack backtracks for minutes).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.sweep import ROOT, SweepError, load  # noqa: E402

EXECUTORS = ("local", "vertex")


def requirements(accelerator: str | None, count: int):
    """xm.JobRequirements for the accelerator (an XManager resource name, e.g. tpu_v4, a100)."""
    from xmanager import xm

    if accelerator is None:
        return xm.JobRequirements()
    try:
        return xm.JobRequirements(**{accelerator: count})
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise SweepError(f"--accelerator={accelerator}: not an XManager resource ({e})") from None


def executor(kind: str, reqs):
    from xmanager import xm_local

    return xm_local.Local() if kind == "local" else xm_local.Vertex(requirements=reqs)


def docker_instructions(accelerator: str | None) -> list[str]:
    """The image: this project installed with the jax build for the accelerator."""
    jax = "jax[tpu]" if (accelerator or "").startswith("tpu") else "jax[cuda12]" if accelerator else "jax"
    project = os.path.basename(ROOT)
    return [
        "ENV LANG=C.UTF-8",
        "RUN python -m pip install --upgrade pip",
        f"COPY --chown=1000:root {project}/ /lora_jax",
        "WORKDIR /lora_jax",
        f"RUN python -m pip install -e '.[tf]' '{jax}'",
    ]


def jobs(runs, root: str, python: str = "python") -> list[tuple[str, list[str]]]:
    """(work unit name, main.py command) of every run, workdirs under root."""
    return [(r.name, r.command(f"{root.rstrip('/')}/{r.name}", python)) for r in runs]


def launch(a) -> int:
    runs = load(a.sweep)
    if a.executor not in EXECUTORS:
        raise SweepError(f"--executor={a.executor}: valid: {', '.join(EXECUTORS)}")
    if a.executor == "vertex" and not a.root.startswith("gs://"):
        raise SweepError(f"--root={a.root}: Vertex AI jobs need a gs:// root (their disks are not yours)")
    reqs = requirements(a.accelerator, a.accelerator_count)
    exe = executor(a.executor, reqs)  # built for real even in a dry run: bad requirements fail here
    planned = jobs(runs, a.root)
    if a.dry_run:
        for name, command in planned:
            print(f"[{name}] executor={a.executor} requirements={reqs}\n  {' '.join(command)}")
        print("image: " + "; ".join(docker_instructions(a.accelerator)))
        return 0
    from xmanager import xm, xm_local

    with xm_local.create_experiment(experiment_title=a.title or os.path.basename(a.root.rstrip("/"))) as experiment:
        [executable] = experiment.package(
            [
                xm.python_container(
                    executor_spec=exe.Spec(),
                    path=ROOT,
                    base_image=a.base_image,
                    docker_instructions=docker_instructions(a.accelerator),
                    entrypoint=xm.CommandList(["python main.py"]),  # the job's args follow
                )
            ]
        )
        for name, command in planned:
            experiment.add(xm.Job(executable, exe, name=name, args=command[2:]))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", required=True)
    p.add_argument("--root", required=True, help="directory (gs:// on Vertex) holding one workdir per run")
    p.add_argument("--executor", default="local", help="local | vertex")
    p.add_argument("--accelerator", default=None, help="XManager resource name: tpu_v4, tpu_v5e, a100, h100, …")
    p.add_argument("--accelerator_count", type=int, default=1)
    p.add_argument("--base_image", default="python:3.11", help="container base image (add jax[tpu]/[cuda12] there)")
    p.add_argument("--title", default=None, help="experiment title (default: the root's name)")
    p.add_argument("--dry_run", action="store_true", help="print each job's command and requirements, launch nothing")
    a = p.parse_args(argv)
    try:
        return launch(a)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e}; install the launch extra: pip install -r requirements/launch.lock", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
