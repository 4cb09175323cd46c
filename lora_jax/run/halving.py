"""Successive halving over the arms of one joint run (`train.halving`), and the step-0 proxy.

At each rung (a fraction of train.total_steps) the live arms are scored on the test split —
`metric="loss"`: the held-out token loss (lower is better); `"score"`: the dataset's suite metric,
in its own direction — and the best max(1, n // eta) go on. The others leave the bank: each keeps
its checkpoint at the rung (a rung step always saves), writes its results at the rung and
`pruned_at` into its summary.json, and exports no adapter. The training program is then rebuilt for
the arms that are left (their states are carried over exactly: joint training equals separate
runs, so removing an arm changes nothing for the others).

The decisions are recorded in <root>/joint/halving.json, written after the pruned arms' summaries
and after every live arm's checkpoint at the rung is complete. A resumed run reads it first and
builds only the arms still live (the decision is replayed, never re-made); a kill before it was
written makes the resumed run decide again at the same step, from the same checkpoint, the same way.

The step-0 proxy ranks the arms before any training: each arm's adapter gradient norm on the first
`proxy_batches` training batches, normalised per trainable parameter (see `proxy_scores`), written to
<root>/joint/step0_proxy.json. It trains nothing and changes nothing in the run.

No selection code here reads config.planted (a planted study's answer): only scores measured on data.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from lora_jax.errors import ConfigError, WorkdirError
from lora_jax.io.files import write_text_atomic
from lora_jax.model.arm_views import target_kind
from lora_jax.sharding import under_mesh
from lora_jax.train.step import arm_grad_norms, batch_loss_sums, micro_batches

RECORD = "halving.json"
PROXY = "step0_proxy.json"
METRICS = ("loss", "score")


@dataclasses.dataclass(frozen=True)
class HalvingPlan:
    """train.halving resolved against train.total_steps: the steps at which rungs are decided."""

    rungs: tuple[float, ...]
    steps: tuple[int, ...]
    eta: int
    metric: str
    proxy_batches: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> HalvingPlan | None:
        """None when the run does not halve (train.halving.rungs empty)."""
        h = config.train.halving
        if not h.rungs:
            return None
        total = config.train.total_steps
        steps = tuple(rung_step(f, total) for f in h.rungs)
        return cls(tuple(float(f) for f in h.rungs), steps, int(h.eta), str(h.metric), int(h.proxy_batches))

    def settings(self) -> dict:
        """What a resumed run must agree with (recorded in halving.json)."""
        return {"rungs": list(self.rungs), "steps": list(self.steps), "eta": self.eta, "metric": self.metric}

    def evaluators(self, configured) -> tuple[str, ...]:
        """The evaluators a rung runs: the test loss, and the suite when the rung ranks on its score."""
        return ("loss", "generate") if self.metric == "score" and "generate" in configured else ("loss",)


def rung_step(fraction: float, total: int) -> int:
    return int(round(fraction * total))


def check_halving(config: ml_collections.ConfigDict) -> None:
    """train.halving: rungs strictly increasing fractions whose steps fall strictly inside the run, on
    a joint run (config.arms); eta >= 2; a known metric ("score" needs the "generate" evaluator)."""
    h = config.train.halving
    if h.eta < 2 or not isinstance(h.eta, int):
        raise ConfigError(f"train.halving.eta={h.eta!r} must be an integer >= 2")
    if h.metric not in METRICS:
        raise ConfigError(f"train.halving.metric={h.metric!r} is unknown; valid: {', '.join(METRICS)}")
    if h.proxy_batches < 0:
        raise ConfigError(f"train.halving.proxy_batches={h.proxy_batches} must be >= 0 (0 = no step-0 proxy)")
    if not h.rungs:
        return
    if not config.arms:
        raise ConfigError("train.halving.rungs: successive halving picks among the arms of a joint run (config.arms)")
    total = config.train.total_steps
    steps = [rung_step(f, total) for f in h.rungs]
    if any(not 0 < s < total for s in steps) or sorted(set(steps)) != steps:
        raise ConfigError(
            f"train.halving.rungs={tuple(h.rungs)} must be increasing fractions of train.total_steps={total} "
            f"whose steps ({', '.join(map(str, steps))}) are distinct and strictly between 0 and {total}"
        )
    if h.metric == "score" and "generate" not in config.eval.evaluators:
        raise ConfigError('train.halving.metric="score" ranks on the suite: eval.evaluators must include "generate"')


def decide(
    scores: dict[str, float], eta: int, higher_is_better: bool, tiebreak: dict[str, float] | None = None
) -> tuple[list[str], list[str]]:
    """(kept, pruned): the best max(1, n // eta) arms by score go on. Ties (a coarse score such as a
    fraction of tokens ties easily) go to the lower `tiebreak` (the test loss), then to the earlier
    arm (the order of `scores`). A non-finite score ranks last."""
    names = list(scores)
    tiebreak = tiebreak or {}

    def finite(v) -> bool:
        return v is not None and math.isfinite(v)

    def badness(i: int) -> tuple:
        v, t = scores[names[i]], tiebreak.get(names[i])
        if not finite(v):
            return (1, 0.0, 0.0, i)
        return (0, -v if higher_is_better else v, t if finite(t) else math.inf, i)

    order = sorted(range(len(names)), key=badness)
    keep = max(1, len(names) // eta)
    kept = sorted(order[:keep])
    return [names[i] for i in kept], [names[i] for i in sorted(order[keep:])]


class HalvingRecord:
    """<root>/joint/halving.json: the plan's settings and every rung decided so far."""

    def __init__(self, shared: epath.Path, plan: HalvingPlan):
        self.path = epath.Path(shared) / RECORD
        self.plan = plan
        self.rungs: list[dict] = []
        if self.path.exists():
            try:
                recorded = json.loads(self.path.read_text())
                settings, rungs = recorded["settings"], list(recorded["rungs"])
            except (ValueError, KeyError, TypeError) as e:
                raise WorkdirError(f"{self.path}: unreadable halving record ({e}); remove the run's workdir") from None
            if settings != plan.settings():
                raise WorkdirError(
                    f"{self.path} was decided with train.halving {settings}, the config asks for "
                    f"{plan.settings()}: resume with the recorded settings or start in a new workdir"
                )
            self.rungs = rungs

    def decided(self, step: int) -> bool:
        return any(r["step"] == step for r in self.rungs)

    def pruned(self) -> dict[str, int]:
        """arm -> the step it was pruned at, over every recorded rung."""
        return {a: r["step"] for r in self.rungs for a in r["pruned"]}

    def dropped(self) -> dict[str, int]:
        """arm -> the step it stopped at, for arms that diverged before a rung (they left the bank there)."""
        return {a: step for r in self.rungs for a, step in r.get("dropped", {}).items()}

    def gone(self) -> set[str]:
        """Arms no longer in the bank: pruned, or diverged before a decided rung."""
        return set(self.pruned()) | set(self.dropped())

    def check_resume(self, start: int) -> None:
        """A run resumed at `start` has every rung before it decided (else its arms are not the ones an
        uninterrupted run would have at `start`)."""
        missing = [s for s in self.plan.steps if s < start and not self.decided(s)]
        if missing:
            raise WorkdirError(
                f"{self.path}: no decision recorded for the rung at step {missing[0]}, resumed at {start}"
            )

    def add(self, entry: dict) -> None:
        self.rungs.append(entry)
        if jax.process_index() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps({"settings": self.plan.settings(), "rungs": self.rungs}, indent=1))

    def arm_steps(self, names: list[str], total: int, stopped: dict[str, int] | None = None) -> int:
        """Steps trained summed over the arms: a pruned arm's stop at its rung, a diverged arm's where it
        stopped (`stopped`, or the record's), the others' at `total`."""
        ends = {n: total for n in names} | self.dropped() | (stopped or {}) | self.pruned()
        return sum(ends[n] for n in names)


# -- the step-0 proxy ----------------------------------------------------------------------------


PROXY_DEFINITION = (
    "mean over the first batches of training of ||grad of the batch's mean token loss w.r.t. the arm's "
    "adapters||_2 / sqrt(the arm's lora_B parameters), at the fresh adapters (step 0, no dropout; B = 0 "
    "there, so only B has a gradient): an RMS gradient per B parameter; higher ranks first"
)


def make_arm_grad_norms(graphdef, chunk: int, bank, accum: int = 1, mesh=None):
    """(lora, frozen, batch) -> [K]: each arm's gradient norm of the batch's mean token loss (no dropout),
    summed over `accum` micro-batches as the train step does (the same memory)."""

    def fn(lora, frozen, batch):
        def loss(lo, mb):
            nll, n = batch_loss_sums(graphdef, lo, frozen, mb, chunk, None)
            return jnp.sum(nll), n  # arms touch only their own rows: each arm's gradient is its own

        def accumulate(carry, mb):
            grads, count = carry
            (_, n), g = jax.value_and_grad(loss, has_aux=True)(lora, mb)
            return (jax.tree.map(jnp.add, grads, g), count + n), None

        init = (jax.tree.map(jnp.zeros_like, lora), jnp.zeros((), jnp.float32))
        (grads, count), _ = jax.lax.scan(accumulate, init, micro_batches(batch, accum))
        return arm_grad_norms(jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads), bank)

    return fn if mesh is None else under_mesh(fn, mesh)


def b_parameters(views) -> list[int]:
    """Each arm's lora_B parameter count (its own rank, no bank padding)."""
    return [
        sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(t)[0] if target_kind(p)[1] == "lora_b")
        for t in views.templates
    ]


def proxy_scores(grad_norms: np.ndarray, params: list[int]) -> np.ndarray:
    """[batches, K] gradient norms and each arm's lora_B parameter count -> [K] proxy values: the mean
    norm over batches divided by sqrt(params) (an RMS gradient per B parameter, so an arm is not ranked
    up merely for carrying more adapters)."""
    return np.mean(np.asarray(grad_norms, np.float64), axis=0) / np.sqrt(np.asarray(params, np.float64))


def write_proxy(shared: epath.Path, names: list[str], values: np.ndarray, batches: int) -> dict:
    order = sorted(range(len(names)), key=lambda i: (-values[i], i))
    out = {
        "definition": PROXY_DEFINITION,
        "batches": batches,
        "arms": {n: float(v) for n, v in zip(names, values)},
        "ranking": [names[i] for i in order],
    }
    if jax.process_index() == 0:
        shared.mkdir(parents=True, exist_ok=True)
        write_text_atomic(epath.Path(shared) / PROXY, json.dumps(out, indent=1))
    return out
