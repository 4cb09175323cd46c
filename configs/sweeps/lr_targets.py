"""Targets x learning-rate settings as one joint run per seed, picked by successive halving.

Every arm (target set) is trained at every setting as an arm variant `<arm>@lp=<r>` (LoRA+ ratio)
and/or `@lr_<target>=<m>` (a target's learning-rate multiplier), all in one AdapterBank over one
base; train.halving prunes to the best. The report has a row per arm and setting (the variant's
name) and an Early selection section.

`--sweep=configs/sweeps/lr_targets.py:<options>`, options comma-separated:
  dataset=<name>             a text dataset with a joint config (configs/<name>_all_arms.py), or
  planted=<target>[+…]       the planted study (configs/planted_all_arms.py) with P = these targets
  arms=<arm>[+<arm>…]        target sets (default: the dataset's study arms)
  lp=<r>[/<r>…]              LoRA+ ratios (default 1/4/16; 1 = plain LoRA)
  lr=<target>:<m>[/<m>…]     multipliers of one target's learning rate (default: none), e.g. lr=fc2:0.5/2
  seeds=<N>, steps=<N>, runlocal
  halving=<f1>/<f2>/…        rungs (default 0.2/0.4 for up to 9 arms, else 0.1/0.25/0.5); eta=<n> (3);
                             halving=0 trains every variant to the end (rows of the study's table)
Example: `python launch/local.py --sweep=configs/sweeps/lr_targets.py:planted=fc2,arms=fc2+oproj+oproj_fc2,runlocal
--root=/tmp/lr` trains 9 arm variants in one job and halves them 9 -> 3 -> 1.
"""

from __future__ import annotations

import itertools

from configs.sweeps.options import parse_options
from configs.sweeps.study import STUDY_ARMS
from lora_jax.lora.arms import ARMS

OPTIONS = ("dataset", "planted", "arms", "lp", "lr", "seeds", "steps", "runlocal", "halving", "eta")
TARGET_TOKENS = {"qkv": "lr_qkv", "o_proj": "lr_oproj", "fc1": "lr_fc1", "fc2": "lr_fc2"}


def _options(arg: str | None) -> dict:
    out = parse_options(arg, OPTIONS)
    if ("dataset" in out) == ("planted" in out):
        raise ValueError("give one of dataset=<name> or planted=<target>[+<target>…]")
    return out


def _numbers(text: str, what: str) -> list[str]:
    values = [v for v in str(text).split("/") if v]
    for v in values:
        try:
            float(v)
        except ValueError:
            raise ValueError(f"{what}={text}: expected numbers separated by '/'") from None
    return values


def arm_variants(arms, lp_values, lr_target=None, lr_values=()) -> tuple[str, ...]:
    """Every arm at every setting: "oproj@lp=4", "fc2@lp=4@lr_fc2=2"; a setting of 1 is left out of the
    name (the plain arm), and a target's multiplier only varies on arms that carry the target."""
    out = []
    for arm in arms:
        settings = [[f"lp={v}" if float(v) != 1 else "" for v in lp_values]]
        if lr_target and lr_target in ARMS[arm]:
            settings.append([f"{TARGET_TOKENS[lr_target]}={v}" if float(v) != 1 else "" for v in lr_values])
        for combo in itertools.product(*settings):
            name = "@".join([arm, *[s for s in combo if s]])
            if name not in out:
                out.append(name)
    return tuple(out)


def get_sweep(arg: str | None = None) -> list[dict]:
    o = _options(arg)
    if "planted" in o:
        config, dataset = "configs/planted_all_arms.py", "planted"
        default_arms = STUDY_ARMS["cocohd"]  # all nine
    else:
        dataset = o["dataset"]
        config = f"configs/{dataset}_all_arms.py"
        if dataset not in STUDY_ARMS:
            raise ValueError(f"dataset={dataset}: unknown; valid: {', '.join(STUDY_ARMS)}")
        default_arms = STUDY_ARMS[dataset]
    arms = tuple(o["arms"].split("+")) if "arms" in o else default_arms
    lp_values = _numbers(o.get("lp", "1/4/16"), "lp")
    lr_target, lr_values = None, ()
    if "lr" in o:
        lr_target, _, values = str(o["lr"]).partition(":")
        if lr_target not in TARGET_TOKENS:
            raise ValueError(f"lr={o['lr']}: expected <target>:<m>/<m>…, target one of {', '.join(TARGET_TOKENS)}")
        lr_values = _numbers(values, "lr")
    variants = arm_variants(arms, lp_values, lr_target, lr_values)
    if o.get("halving") == "0":
        rungs = ()
    elif "halving" in o and o["halving"] is not True:
        rungs = tuple(float(f) for f in _numbers(o["halving"], "halving"))
    else:
        rungs = (0.2, 0.4) if len(variants) <= 9 else (0.1, 0.25, 0.5)
    runs = []
    for seed in range(int(o.get("seeds", 1))):
        overrides = {
            "arms": variants,
            "train.seed": seed,
            "train.halving.rungs": rungs,
            "train.halving.eta": int(o.get("eta", 3)),
        }
        if "planted" in o:
            overrides["planted.targets"] = tuple(str(o["planted"]).split("+"))
            overrides["train.halving.metric"] = "score"
        if not rungs:
            del overrides["train.halving.rungs"], overrides["train.halving.eta"]
        if "steps" in o:
            overrides["train.total_steps"] = int(o["steps"])
        name = f"{dataset}_lr_targets_s{seed}" if "planted" not in o else f"planted_{o['planted']}_lr_targets_s{seed}"
        runs.append(
            {
                "config": config,
                "config_arg": "runlocal" if o.get("runlocal") or "planted" in o else None,
                "overrides": overrides,
                "name": name,
            }
        )
    return runs
