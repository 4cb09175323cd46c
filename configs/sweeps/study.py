"""The study's grid as a sweep: one run per (dataset, arm, seed), for every launcher.

`--sweep=configs/sweeps/study.py[:options]`, options comma-separated:
  dataset=<name>[+<name>…]   only these datasets (default: all seven)
  arms=<arm>[+<arm>…]        only these arms (default: the arms the study ran for each dataset)
  seeds=<N>                  seeds 0..N-1 of every arm (default 1: seed 0)
  steps=<N>                  train.total_steps for every run (e.g. a quick look)
  runlocal                   the tiny CPU variant of every arm (`<arm file>:runlocal`)
Examples: `:dataset=cocohd` (9 runs), `:seeds=3` (the 55-run grid x 3 = 165 runs),
`:dataset=cocohd,arms=qkv+oproj+fc2,runlocal,steps=4` (3 tiny runs).

A run is {"config": arm file, "config_arg": None | "runlocal", "overrides": {key: value}, "name":
the workdir name}. Plain values only; launch/sweep.py checks and expands them.
"""

from __future__ import annotations

from configs.sweeps.options import parse_options

# The arms each dataset has a config file for: the study's grid, 55 runs with one seed (40 text, 15 image).
STUDY_ARMS = {
    "fincot": ("qkv", "oproj", "fc1", "fc2", "oproj_fc1", "qkv_fc1", "oproj_fc2", "qkv_fc2", "all"),
    "cocohd": ("qkv", "oproj", "fc1", "fc2", "oproj_fc1", "qkv_fc1", "oproj_fc2", "qkv_fc2", "all"),
    "medmcqa": ("qkv", "oproj", "fc1", "fc2", "oproj_fc1", "qkv_fc1", "oproj_fc2", "qkv_fc2", "all"),
    "govreport": ("oproj", "fc1", "oproj_fc1", "qkv_fc1", "oproj_fc2", "qkv_fc2", "all"),
    "medreason": ("oproj", "oproj_fc1", "qkv_fc1", "oproj_fc2", "qkv_fc2", "all"),
    "llavacot": ("qkv", "oproj", "fc1", "fc2", "oproj_fc1", "qkv_fc1", "oproj_fc2", "qkv_fc2", "all"),
    "invoiceocr": ("oproj", "oproj_fc1", "qkv_fc2", "oproj_fc2", "qkv_fc1", "all"),
}


def _options(arg: str | None) -> dict:
    return parse_options(arg, ("dataset", "arms", "seeds", "steps", "runlocal"))


def get_sweep(arg: str | None = None) -> list[dict]:
    o = _options(arg)
    datasets = o.get("dataset", "all")
    datasets = tuple(STUDY_ARMS) if datasets == "all" else tuple(datasets.split("+"))
    unknown = [d for d in datasets if d not in STUDY_ARMS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {', '.join(unknown)}; valid: {', '.join(STUDY_ARMS)}, all")
    seeds = int(o.get("seeds", 1))
    runs = []
    for dataset in datasets:
        arms = tuple(o["arms"].split("+")) if "arms" in o else STUDY_ARMS[dataset]
        for arm in arms:
            for seed in range(seeds):
                overrides = {"train.seed": seed}
                if "steps" in o:
                    overrides["train.total_steps"] = int(o["steps"])
                runs.append(
                    {
                        "config": f"configs/{dataset}_{arm}.py",
                        "config_arg": "runlocal" if o.get("runlocal") else None,
                        "overrides": overrides,
                        "name": f"{dataset}_{arm}_s{seed}",
                    }
                )
    return runs
