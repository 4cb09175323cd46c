"""A planted-answer study as a sweep: all nine arms trained jointly over one base (one run per seed),
on the data of a teacher that is the base + a low-rank delta planted on the module set P.

`--sweep=configs/sweeps/planted.py:planted=<target>[+<target>…][,options]`, options comma-separated:
  planted=fc2 | qkv+fc1 | …   P: the targets the teacher's delta sits on (required)
  seeds=<N>                   seeds 0..N-1 (default 1): each seed trains the nine arms afresh (the
                              teacher, decided by planted.seed, stays the same)
  steps=<N>                   train.total_steps of every run
  rank=<r>, norm=<x>          the planted delta's rank and ||delta W||_F / ||W||_F (configs/base.py)
  hf_dir=<path>               a local Hugging Face checkpoint as the base (the study's full-size
                              settings) instead of the tiny random model (`:runlocal`, the default)
  halving=<f1>/<f2>/…         also a successive-halving run per seed (train.halving.rungs = these
                              fractions of the steps), named <run>_halving, beside the full runs
                              it is compared with; halving=1 takes 0.2/0.4 (9 arms -> 3 -> 1 with
                              eta 3: a third of the full ablation's arm-steps)
  eta=<n>, halving_metric=score|loss
                              its eta (default 3) and what a rung ranks on (default score: the
                              teacher agreement the table ranks on)
Example: `python launch/local.py --sweep=configs/sweeps/planted.py:planted=fc2,seeds=2 --root=/tmp/planted`
writes the report to /tmp/planted/report at the end; adding `,halving=1` adds the halving runs, and
the report's Early selection section compares them with the full ablation. An arm "contains P" when its targets include all
of P; a study that works ranks every such arm above every arm that does not.
"""

from __future__ import annotations

from configs.sweeps.options import parse_options

OPTIONS = ("planted", "seeds", "steps", "rank", "norm", "hf_dir", "halving", "eta", "halving_metric")
DEFAULT_RUNGS = (0.2, 0.4)


def _options(arg: str | None) -> dict:
    out = parse_options(arg, OPTIONS)
    if not isinstance(out.get("planted"), str):
        raise ValueError("planted=<target>[+<target>…] is required, e.g. planted=fc2 or planted=qkv+fc1")
    return out


def get_sweep(arg: str | None = None) -> list[dict]:
    o = _options(arg)
    targets = tuple(o["planted"].split("+"))
    runs = []
    for seed in range(int(o.get("seeds", 1))):
        overrides = {"train.seed": seed, "planted.targets": targets}
        if "steps" in o:
            overrides["train.total_steps"] = int(o["steps"])
        if "rank" in o:
            overrides["planted.rank"] = int(o["rank"])
        if "norm" in o:
            overrides["planted.relative_norm"] = float(o["norm"])
        if "hf_dir" in o:
            overrides["model.hf_dir"] = o["hf_dir"]
        run = {
            "config": "configs/planted_all_arms.py",
            "config_arg": None if "hf_dir" in o else "runlocal",
            "overrides": overrides,
            "name": f"planted_{'+'.join(targets)}_s{seed}",
        }
        runs.append(run)
        if "halving" in o:
            runs.append(dict(run, overrides=overrides | _halving(o), name=run["name"] + "_halving"))
    return runs


def _halving(o: dict) -> dict:
    value = o["halving"]
    if value is True or value == "1":
        rungs = DEFAULT_RUNGS
    else:
        try:
            rungs = tuple(float(f) for f in value.split("/"))
        except ValueError:
            raise ValueError(f"halving={value}: rungs are fractions of the steps separated by '/', e.g. 0.2/0.4")
    return {
        "train.halving.rungs": rungs,
        "train.halving.eta": int(o.get("eta", 3)),
        "train.halving.metric": o.get("halving_metric", "score"),
    }
