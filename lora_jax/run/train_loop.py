"""The training loop, for one arm and for every arm of a dataset in one job (`config.arms`):
config -> data -> model -> sharded LoRA training -> checkpoints, TensorBoard, evaluation suites, PEFT
export. The parts live in assemble.py (building), train/trainer.py (state and steps, and what differs
between one arm and K) and eval/ (evaluators); this module only runs them in order, arm by arm.

A joint run's K arms are an AdapterBank (lora/bank.py): one program trains them on the same batches,
each with its own optimizer state (AdamW is elementwise; clipping is per arm), so arm k's losses and
adapters are those of its own run with the same config (tests/lora/test_adapter_bank.py). Each arm
writes what its own run writes, into its own workdir `<workdir>/<dataset>_<arm>_s<seed>/` (the
sweep's run names): checkpoints (with the arm's own run identity — a separate run of that arm could
resume them), TensorBoard events, the PEFT adapter, eval/<suite>.json, eval/latency.json and
summary.json — so the local runner and eval.report read them like any other runs. What the arms share
(the prepared dataset, the bundled samples) goes to `<workdir>/joint/`.

Resuming restores every arm from the newest step all arms have finished (a kill between two arms'
saves leaves the others one checkpoint ahead; train.max_to_keep >= 2 keeps the step they share). A
diverged arm stops alone: its checkpoints are kept, its summary.json says why, nothing is exported,
and its adapters are frozen at zero while the others go on; when no arm is left (a single arm: at
once) the run ends with a DivergenceError. Evaluation decodes every arm in one pass (per-row adapter
ids) and scores the test loss of all arms in one pass; latency is measured per arm on its own view
(base, unmerged, merged).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from eval.evaluators import EvalContext, run_evaluators
from eval.metrics import LOWER_IS_BETTER
from lora_jax.errors import WorkdirError
from lora_jax.io.checkpoints import all_finite
from lora_jax.io.files import write_text_atomic
from lora_jax.lora.bank import AdapterBank
from lora_jax.model.arm_views import ArmViews
from lora_jax.run.assemble import (
    SHARED_DIR,
    build_bank_model,
    check_workdir_writable,
    data_iterators,
    dataset_counts,
    image_inputs,
    metric_writer,
    open_checkpoint_store,
    prepare_planted,
    rebank_model,
    run_name,
    start_run,
    tokenizer_dir,
)
from lora_jax.run.config import arm_configs, lora_spec, lr_scale
from lora_jax.run.eval_hooks import completion_fn, latency_fn, loss_on_test_split
from lora_jax.run.halving import RECORD as HALVING_RECORD
from lora_jax.run.halving import (
    HalvingPlan,
    HalvingRecord,
    b_parameters,
    decide,
    make_arm_grad_norms,
    proxy_scores,
    write_proxy,
)
from lora_jax.run.summary import (
    diverged_summary,
    print_arms_progress,
    print_arms_summary,
    print_data_counts,
    print_progress,
    print_summary,
    pruned_summary,
    run_summary,
    run_summary_fields,
)
from lora_jax.sharding import global_batch, make_mesh
from lora_jax.train import accounting
from lora_jax.train.divergence import DivergenceDetector, DivergenceError, DivergenceLimits, diverged_message
from lora_jax.train.trainer import build_trainer, export_adapter

# -- the arms and where they write -----------------------------------------------------------------


@dataclasses.dataclass(eq=False)  # arms are compared by identity
class Arm:
    """One arm's bookkeeping (a single-arm run has one): what its own run would hold."""

    config: ml_collections.ConfigDict  # the arm's own run's config
    workdir: epath.Path
    store: object  # io.checkpoints.CheckpointStore
    spec: object  # lora.spec.LoraSpec
    writer: object = None  # eval.events.EventWriter of its workdir
    detector: DivergenceDetector | None = None
    history: list = dataclasses.field(default_factory=list)  # (step, train loss) at each log step
    divergence: object = None  # train.divergence.Divergence once it diverged: it stopped alone
    summary: dict | None = None  # its summary.json, once written

    @property
    def name(self) -> str:
        return self.config.arm

    def stop_message(self) -> str:
        """The line a diverged arm stops with, naming its last checkpoint (train.divergence)."""
        last = self.summary["last_checkpoint_step"]
        return diverged_message(self.divergence, str(self.workdir / "checkpoints" / str(last)) if last else None)


@dataclasses.dataclass
class Layout:
    """Where a run writes and how it reports: `root` is --workdir; `shared` holds what its arms share
    (prepared data, bundled samples): the root itself for one arm, <root>/joint for a joint run;
    `joint` is a joint run's summary.json field {"arms", "workdir"} (None: one arm)."""

    root: epath.Path
    shared: epath.Path
    joint: dict | None = None
    halving: HalvingRecord | None = None  # a halving run's decisions (run/halving.py)

    @property
    def speed_prefix(self) -> str:
        """A joint step trains every arm: its speeds are "joint_step_s", ..., never a single run's."""
        return "joint_" if self.joint else ""

    def summary_fields(self) -> dict:
        fields = {"joint": self.joint} if self.joint else {}
        if self.halving:
            fields["halving"] = dict(self.halving.plan.settings(), record=str(self.halving.path))
        return fields

    def print_progress(self, done: int, total: int, arms: list[Arm], scalars: list[dict], step_s) -> None:
        if not self.joint:
            return print_progress(done, total, scalars[0])
        losses = ["diverged" if a.divergence else s["loss"] for a, s in zip(arms, scalars)]
        print_arms_progress(done, total, [a.name for a in arms], losses, step_s)

    def print_evaluating(self, arm: Arm) -> None:
        if self.joint and jax.process_index() == 0:
            print(f"arm {arm.name}:", flush=True)

    def finish(self, arms: list[Arm], cost: dict) -> None:
        """The run's last lines (process 0); a joint run also writes <root>/joint/summary.json, with
        `cost` (wall-clock seconds and arm-steps: what an early selection is compared on). arms: every
        arm the run started with (a halving run's pruned ones included)."""
        if jax.process_index() != 0:
            return
        if not self.joint:
            return print_summary(arms[0].workdir, arms[0].summary)
        self.shared.mkdir(parents=True, exist_ok=True)
        runs = [str(a.workdir) for a in arms]
        joint = {"arms": self.joint["arms"], "runs": runs, "diverged": [a.name for a in arms if a.divergence]}
        if self.halving:
            pruned = self.halving.pruned()
            joint["halving"] = {
                "record": str(self.halving.path),
                "pruned": pruned,
                "selected": [a.name for a in arms if a.name not in pruned and not a.divergence],
            }
        joint["cost"] = cost
        (self.shared / "summary.json").write_text(json.dumps(joint, indent=2))
        print_arms_summary(self.root, [a.name for a in arms], [a.workdir for a in arms], [a.summary for a in arms])


def start_arms(config: ml_collections.ConfigDict, workdir: str):
    """Every check before anything is written, then the mesh and the model: (layout, [(config, workdir)]
    per arm, mesh, model, base fingerprint, ArmViews or None, [(config, workdir)] of arms a halving run
    pruned before). One arm: the config itself in workdir; config.arms: each arm's own config in
    <workdir>/<its run name>/, over one AdapterBank model of the arms still live."""
    if not config.arms:
        root, mesh, model, fingerprint = start_run(config, workdir)
        return Layout(root, root), [(config, root)], mesh, model, fingerprint, None, []
    configs = arm_configs(config)  # every config check, each arm's included
    root = epath.Path(workdir)
    check_workdir_writable(root)
    plan = HalvingPlan.from_config(config)
    if not plan and (root / SHARED_DIR / HALVING_RECORD).exists():  # would bring its pruned arms back
        raise WorkdirError(
            f"{root / SHARED_DIR / HALVING_RECORD}: this workdir holds a successive-halving run; resume it "
            "with its train.halving settings, or use a fresh --workdir"
        )
    record = HalvingRecord(root / SHARED_DIR, plan) if plan else None
    pruned = record.gone() if record else set()  # decided before a kill: replayed, never re-made
    live = [c for c in configs if c.arm not in pruned]
    mesh = make_mesh(config.mesh.shape)
    model, fingerprint, views = build_bank_model(live, [c.arm for c in live], mesh)
    layout = Layout(root, root / SHARED_DIR, {"arms": [c.arm for c in configs], "workdir": str(root)}, record)
    gone = [(c, root / run_name(c)) for c in configs if c.arm in pruned]
    return layout, [(c, root / run_name(c)) for c in live], mesh, model, fingerprint, views, gone


def common_step(stores) -> int:
    """The newest step every arm has finished (0: start fresh); one arm: its latest step."""
    steps = [set(s.manager.all_steps()) for s in stores]
    if not any(steps):
        return 0
    common = set.intersection(*steps)
    if not common:
        have = ", ".join(f"{s.dir}: {sorted(x) or 'none'}" for s, x in zip(stores, steps))
        raise WorkdirError(f"the arms' checkpoints share no step ({have}); resume each arm on its own or start afresh")
    return max(common)


# -- the loop ------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Trains one arm, or config.arms jointly (resuming from the workdir's checkpoints), evaluates and
    exports each arm; returns their summaries (summary.json), one per arm."""
    began = time.perf_counter()
    layout, arm_dirs, mesh, model, fingerprint, views, gone = start_arms(config, workdir)
    # each store refuses a foreign workdir before any write
    arms = [Arm(c, w, open_checkpoint_store(c, w, fingerprint), lora_spec(c)) for c, w in arm_dirs]
    pruned_arms = [Arm(c, w, None, lora_spec(c)) for c, w in gone]  # their summary.json was written at the rung
    prepare_planted(config, layout.shared, mesh)  # a planted study's teacher data, before its tokenizer
    tok_dir = tokenizer_dir(config, layout.shared)
    trainer = build_trainer(model, config, mesh, views, [lr_scale(a.config) for a in arms])
    lora, frozen, opt_state, batch_sh = trainer.lora, trainer.frozen, trainer.opt_state, trainer.batch_sharding
    images = image_inputs(model, config)
    data = data_iterators(config, layout.shared, tok_dir, model.config.vocab_size, batch_sh, images)

    limits = DivergenceLimits.from_config(config)
    for arm, norm in zip(arms, trainer.adapter_norms(lora)):  # the fresh adapters' norms
        arm.detector = DivergenceDetector(limits, norm)
    start = common_step([a.store for a in arms])
    if layout.halving:
        layout.halving.check_resume(start)
    if start:
        targets = trainer.split(lora, opt_state)  # the arms' fresh states give the layout to restore onto
        restored = [a.store.restore(start, *targets[k]) for k, a in enumerate(arms)]
        lora, opt_state = trainer.stack(lora, opt_state, [r[:2] for r in restored])
        data.train.set_state(restored[0][2])
        logging.info("resumed %d arm(s) from step %d", len(arms), start)

    n_trainable = [sum(accounting.lora_params_per_target(model.config, a.spec).values()) for a in arms]
    for arm in arms:
        arm.writer = metric_writer(arm.workdir)
        if start == 0:
            hparams = traverse_util.flatten_dict(arm.config.to_dict(), sep=".")
            arm.writer.write_hparams({k: str(v) for k, v in hparams.items()})
    data_counts = dataset_counts(config, layout.shared)
    print_data_counts([a.writer for a in arms], data_counts)
    total, b, t = config.train.total_steps, config.train.global_batch_size, config.data.max_seq_len
    flops_per_step = sum(accounting.train_flops_per_step(model.config, a.spec, b, t) for a in arms)
    peak = accounting.measure_matmul_peak()

    context = model.config.max_position_embeddings
    evaluate = functools.partial(evaluate_arms, arms, layout, trainer, data, config, mesh, context)
    plan = layout.halving.plan if layout.halving else None
    if plan and plan.proxy_batches and start == 0:
        step0_proxy(trainer, lora, frozen, data, config, mesh, [a.name for a in arms], layout.shared)

    timer = StepTimer()
    counts = []  # (target, real) token counts of the steps since the last log, on device until then
    for step in range(start, total):
        if plan and step in plan.steps and not layout.halving.decided(step):
            kept = halving_rung(step, arms, layout, trainer, lora, evaluate, config, model.config, fingerprint, start)
            if len(kept) < len(arms):  # the program is rebuilt for the arms left
                pruned_arms += [a for a in arms if a not in kept]
                trainer, lora, opt_state = rebuild_trainer(trainer, lora, opt_state, arms, kept, config, mesh)
                arms, frozen = kept, trainer.frozen
                n_trainable = [sum(accounting.lora_params_per_target(model.config, a.spec).values()) for a in arms]
                flops_per_step = sum(accounting.train_flops_per_step(model.config, a.spec, b, t) for a in arms)
                evaluate = functools.partial(evaluate_arms, arms, layout, trainer, data, config, mesh, context)
                timer = StepTimer()  # the next step compiles the new program: a fresh timing window
        batch = global_batch(next(data.train), batch_sh, b)
        lora, opt_state, metrics = trainer.train_step(lora, opt_state, frozen, batch, step)
        done = step + 1
        timer.tick(metrics)
        counts.append((metrics["target_tokens"], metrics["real_tokens"]))
        is_log, is_ckpt, is_eval = step_events(config, done, plan.steps if plan else ())
        if is_log or is_ckpt:
            host = jax.device_get(metrics)
            last = [trainer.arm_metrics(host, k) for k in range(len(arms))]
            newly = set()
            for k, arm in enumerate(arms):
                found = None if arm.divergence else arm.detector.check(done, last[k]["loss"], last[k]["adapter_norm"])
                if found:  # before this step's checkpoint: every saved step passed the check
                    arm.history.append((done, last[k]["loss"]))
                    fields = run_summary_fields(arm.config, arm.spec, model.config, arm.history, fingerprint, start)
                    stop_arm(arm, found, fields | layout.summary_fields())
                    newly.add(k)
            if newly:
                go_on_without(arms, newly)  # raises when no arm is left
                lora, opt_state = trainer.freeze_arms(lora, opt_state, newly)
        if is_log:
            targets, real = np.mean(jax.device_get(counts), axis=0)
            counts = []
            step_s = timer.step_s()
            speeds = speed_scalars(step_s, real, targets, b * t, flops_per_step, peak, layout.speed_prefix)
            common = {"train_dropped_examples": data.train.dropped, **speeds}
            scalars = [m | {"trainable_params": n} | common for m, n in zip(last, n_trainable)]
            for arm, arm_scalars in zip(arms, scalars):
                if not arm.divergence:
                    arm.writer.write_scalars(done, arm_scalars)
                    arm.history.append((done, arm_scalars["loss"]))
            layout.print_progress(done, total, arms, scalars, step_s)
        if is_ckpt:
            if not all_finite(lora):
                raise FloatingPointError(f"non-finite LoRA weights at step {done}; not saving")
            data_state = data.train.get_state()
            with timer.paused(metrics):  # the blocking part of an orbax save is not training time
                for k, (arm, (arm_lora, arm_opt)) in enumerate(zip(arms, trainer.split(lora, opt_state))):
                    # a resumed joint run repeats a step some arm had saved before the kill: exactly
                    if arm.divergence or done in arm.store.manager.all_steps():
                        continue
                    meta = {"loss": last[k]["loss"], "config": arm.config.to_json()}
                    arm.store.save(done, arm_lora, arm_opt, data_state, meta)
        if is_eval:
            with timer.paused(metrics):
                evaluate(lora, done)
    for arm in arms:
        arm.store.wait()
    trained = time.perf_counter()
    for k, (arm, (arm_lora, _)) in enumerate(zip(arms, trainer.split(lora))):  # before evaluation: never lost to it
        if not arm.divergence:
            base_name = config.model.hf_dir or ""
            export_adapter(trainer.arm_graphdef(k), arm_lora, frozen, arm.workdir, base_name, fingerprint)
    results = evaluate(lora, total)
    for arm, result in zip(arms, results):
        arm.writer.close()  # flushed; the run writes no more events
        if arm.divergence:
            continue
        dropped = data.train.dropped
        summary = run_summary(
            arm.config, arm.spec, model.config, result, arm.history, dropped, data_counts, fingerprint, start
        )
        arm.summary = summary | layout.summary_fields()
        if jax.process_index() == 0:
            (arm.workdir / "summary.json").write_text(json.dumps(arm.summary, indent=2))
    everyone = sorted(arms + pruned_arms, key=lambda a: layout.joint["arms"].index(a.name)) if layout.joint else arms
    for arm in pruned_arms:
        if arm.summary is None:  # pruned before a resume: its summary.json was written then
            arm.summary = json.loads((arm.workdir / "summary.json").read_text())
    stopped = {a.name: a.summary["final_step"] for a in everyone if a.summary and a.summary["status"] == "diverged"}
    names = [a.name for a in everyone]
    arm_steps = layout.halving.arm_steps(names, total, stopped) if layout.halving else total * len(arms)
    proxy = len(names) * plan.proxy_batches if plan else 0  # a forward and backward per arm and batch
    layout.finish(everyone, run_cost(began, trained, start, arm_steps, proxy))
    return [a.summary for a in everyone]


def run_cost(began: float, trained: float, start: int, arm_steps: int, proxy_arm_steps: int = 0) -> dict:
    """What the run cost this process: wall-clock seconds in all (model building, training,
    evaluation, export) and until training ended; arm-steps, the steps each arm trained summed over
    arms (from step 0, a resumed run's included); proxy_arm_steps, the step-0 proxy's batches x arms
    (a forward and backward each, no update: about a training step's work). A resumed run's seconds
    are its last process's."""
    now = time.perf_counter()
    return {
        "wall_s": round(now - began, 3),
        "train_wall_s": round(trained - began, 3),
        "arm_steps": arm_steps,
        "proxy_arm_steps": proxy_arm_steps,
        "resumed_from": start,
    }


# -- successive halving ----------------------------------------------------------------------------


def halving_rung(step, arms, layout, trainer, lora, evaluate, config, model_cfg, fingerprint, start) -> list[Arm]:
    """The rung at `step` (run/halving.py): scores the live arms on the test split, writes the pruned
    arms' summary.json, then the decision (after every live arm's checkpoint at `step` is complete);
    returns the arms that go on. Diverged arms leave the bank here too."""
    plan, record = layout.halving.plan, layout.halving
    results = evaluate(lora, step, plan.evaluators(config.eval.evaluators))
    live = [(a, r) for a, r in zip(arms, results) if not a.divergence]
    losses = {a.name: r["loss"]["eval_loss"] for a, r in live}
    if plan.metric == "loss":
        scores, metric, hib = losses, "eval_loss", False
    else:
        metric = live[0][1]["generate"]["metric"]
        scores, hib = {a.name: r["generate"]["score"] for a, r in live}, metric not in LOWER_IS_BETTER
    kept, pruned = decide(scores, plan.eta, hib, tiebreak=losses)
    for arm in arms:
        arm.store.wait()
    rung = {"step": step, "metric": metric, "higher_is_better": hib, "scores": scores, "kept": kept, "pruned": pruned}
    rung["dropped"] = {a.name: a.summary["final_step"] for a in arms if a.divergence}  # diverged: leave too
    for arm, result in live:
        if arm.name in pruned:
            fields = run_summary_fields(arm.config, arm.spec, model_cfg, arm.history, fingerprint, start)
            rung_of_arm = {"metric": metric, "score": scores[arm.name], "rank": sorted_rank(scores, arm.name, hib)}
            arm.summary = pruned_summary(step, rung_of_arm, result, fields | layout.summary_fields())
            arm.writer.close()
            if jax.process_index() == 0:
                write_text_atomic(arm.workdir / "summary.json", json.dumps(arm.summary, indent=2))
    record.add(rung)
    if jax.process_index() == 0:
        shown = "  ".join(f"{n} {scores[n]:.4f}" for n in scores)
        print(f"halving at step {step} ({metric}): {shown}; go on: {', '.join(kept)}", flush=True)
    return [a for a in arms if a.name in kept]


def sorted_rank(scores: dict, name: str, higher_is_better: bool) -> int:
    """1-based rank of `name` among `scores` (1 = best)."""
    ordered = sorted(scores, key=lambda n: -scores[n] if higher_is_better else scores[n])
    return ordered.index(name) + 1


def rebuild_trainer(trainer, lora, opt_state, arms: list[Arm], kept: list[Arm], config, mesh):
    """A trainer (new program) for the kept arms over the same base, holding exactly their states."""
    states = trainer.split(lora, opt_state)
    keep = [k for k, a in enumerate(arms) if a in kept]
    bank = AdapterBank(tuple(arms[k].name for k in keep), tuple(arms[k].spec for k in keep))
    model = rebank_model(trainer.model(lora), bank, mesh)
    scales = [lr_scale(arms[k].config) for k in keep]
    new = build_trainer(model, config, mesh, ArmViews.build(model.config, bank, model.options), scales)
    lora, opt_state = new.stack(new.lora, new.opt_state, [states[k] for k in keep])
    return new, lora, opt_state


def step0_proxy(trainer, lora, frozen, data, config, mesh, names, shared) -> None:
    """Writes <shared>/step0_proxy.json: each arm's normalised adapter gradient norm on the first
    train.halving.proxy_batches training batches, before any step (run/halving.py)."""
    n = config.train.halving.proxy_batches
    accum, chunk = config.optim.grad_accum_steps, config.train.loss_chunk_tokens
    fn = jax.jit(make_arm_grad_norms(trainer.graphdef, chunk, trainer.views.bank, accum, mesh))
    it, b = data.train_iterator(), config.train.global_batch_size
    norms = [
        np.asarray(jax.device_get(fn(lora, frozen, global_batch(next(it), trainer.batch_sharding, b))))
        for _ in range(n)
    ]
    out = write_proxy(shared, names, proxy_scores(np.stack(norms), b_parameters(trainer.views)), n)
    if jax.process_index() == 0:
        print(f"step-0 proxy ({n} batches): " + ", ".join(out["ranking"]), flush=True)


# -- evaluation and speed -------------------------------------------------------------------------


def evaluate_arms(
    arms, layout, trainer, data, config, mesh, context: int, lora, step: int, evaluators=None
) -> list[dict | None]:
    """Every live arm's evaluators at `step` (None for a diverged arm), arm k through its own view;
    the test loss and the completions of all arms in one pass each. context: the model's positions.
    evaluators: the names to run (default: the config's)."""
    arm_loras = [x[0] for x in trainer.split(lora)]
    complete_all = completion_fn(
        lambda: trainer.model(lora), data.tokenizer, data.sft_options, mesh, num_arms=trainer.bank_arms
    )
    losses, completions = [], {}

    def eval_loss(k):
        if not losses:
            it = data.eval_iterator()
            losses.append(
                loss_on_test_split(trainer.eval_step, lora, trainer.frozen, it, config, trainer.batch_sharding)
            )
        loss, truncated = losses[0]
        return float(np.atleast_1d(loss)[k]), truncated

    def complete(k, records, suite):
        key = (suite.name, len(records))
        if key not in completions:
            out = complete_all(records, suite)
            completions[key] = out if trainer.bank_arms else [out]
        return completions[key][k]

    results = []
    for k, arm in enumerate(arms):
        if arm.divergence:
            results.append(None)
            continue
        layout.print_evaluating(arm)
        final = step == config.train.total_steps
        adapter = arm.workdir / "adapter" if final else arm.workdir / "checkpoints" / str(step)
        ctx = EvalContext(
            config=arm.config,
            workdir=arm.workdir,
            writer=arm.writer,
            sources=data.sources,
            complete=functools.partial(complete, k),
            eval_loss=functools.partial(eval_loss, k),
            adapter=str(adapter),
            adapter_source="training",
            write_text=write_text_atomic,
            latency=latency_fn(functools.partial(trainer.arm_model, k, arm_loras[k]), arm.config, context),
        )
        results.append(run_evaluators(ctx, step, evaluators))
    return results


def speed_scalars(step_s, real, targets, tokens_per_step: int, flops_per_step, peak, prefix: str = "") -> dict:
    """The training speed since the last log ({} before two steps ran): tokens_per_s (padded rows x
    length: what the hardware processed), real_tokens_per_s (without padding), target_tokens_per_s
    (tokens in the loss), step_s and mfu; real, targets: mean token counts per step. prefix: "joint_"
    for the step that trains every arm of a joint run."""
    if not step_s:
        return {}
    speeds = {
        "tokens_per_s": tokens_per_step / step_s,
        "real_tokens_per_s": real / step_s,
        "target_tokens_per_s": targets / step_s,
        "step_s": step_s,
        "mfu": accounting.mfu(flops_per_step, step_s, peak, jax.device_count()),
    }
    return {prefix + name: v for name, v in speeds.items()}


# -- divergence ------------------------------------------------------------------------------------


def stop_arm(arm: Arm, found, fields: dict) -> None:
    """A diverged arm stops: waits for its checkpoints being written (the last one passed the check and
    is kept), records the divergence in its summary.json; nothing is exported."""
    arm.store.wait()
    arm.divergence = found
    arm.summary = diverged_summary(found, arm.store.latest_step(), fields)
    if jax.process_index() == 0:
        (arm.workdir / "summary.json").write_text(json.dumps(arm.summary, indent=2))


def go_on_without(arms: list[Arm], newly: set[int]) -> None:
    """After arms `newly` diverged: a DivergenceError when no arm is left (a single arm's names its last
    checkpoint), else one line per stopped arm."""
    if all(a.divergence for a in arms):
        if len(arms) == 1:
            raise DivergenceError(arms[0].stop_message())
        raise DivergenceError("every arm diverged: " + "; ".join(f"{a.name}: {a.divergence.detail}" for a in arms))
    if jax.process_index() == 0:
        for k in sorted(newly):
            print(f"arm {arms[k].name}: {arms[k].stop_message()}; the other arms go on", flush=True)


# -- timing and events -----------------------------------------------------------------------------


class StepTimer:
    """Seconds per training step over the steps since the previous reading (from the second step on:
    the first one compiles), less the time spent inside `paused()` — evaluation and checkpoint
    writes — so that tokens/s, MFU and the ETA describe training alone.

    step_s = (clock at this reading - clock at the previous one - paused seconds) / steps ticked
    since. Readings are taken after the host fetched the step's metrics (the device is done)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.start, self.steps, self.paused_s = None, 0, 0.0

    def tick(self, metrics) -> None:
        if self.start is None:
            jax.block_until_ready(metrics)
            self.start = self.clock()
        else:
            self.steps += 1

    @contextlib.contextmanager
    def paused(self, pending=None):
        """Time spent inside is not training time. pending: the last step's outputs, waited for first,
        so that the steps still running on the device count as training."""
        if pending is not None:
            jax.block_until_ready(pending)
        began = self.clock()
        try:
            yield
        finally:
            self.paused_s += self.clock() - began

    def step_s(self) -> float | None:
        """Seconds per step since the previous reading (None before two steps ran); starts a new window."""
        if not self.steps:
            return None
        now = self.clock()
        seconds = (now - self.start - self.paused_s) / self.steps
        self.start, self.steps, self.paused_s = now, 0, 0.0
        return seconds


def step_events(config, done: int, rungs=()) -> tuple[bool, bool, bool]:
    """(log, checkpoint, intermediate evaluation) after `done` steps; the last step and a halving rung's
    step (`rungs`) log and save."""
    total = config.train.total_steps
    is_log = done % config.train.log_every_steps == 0 or done == total or done in rungs
    is_ckpt = done % config.train.checkpoint_every_steps == 0 or done == total or done in rungs
    every = config.eval.eval_every_steps
    # a rung step is evaluated by its rung (before the next step), not twice
    return is_log, is_ckpt, bool(every and done % every == 0 and done < total and done not in rungs)
