"""Every arm of a dataset in one training job over one copy of the frozen base (`config.arms`).

The K arms are an AdapterBank (lora/bank.py): one program trains them on the same batches, each
with its own optimizer state (AdamW is elementwise; clipping is per arm), so arm k's losses and
adapters are those of its own run with the same config (tests/lora/test_adapter_bank.py). Each arm
writes what its own run writes, into its own workdir `<workdir>/<dataset>_<arm>_s<seed>/` (the
sweep's run names): checkpoints (with the arm's own run identity — a separate run of that arm
could resume them), TensorBoard events, the PEFT adapter, eval/<suite>.json, eval/latency.json and
summary.json — so the local runner and eval.report read them like any other runs. What the arms
share (the prepared dataset, the bundled samples) goes to `<workdir>/joint/`.

Resuming restores every arm from the newest step all arms have finished (a kill between two arms'
saves leaves the others one checkpoint ahead; train.max_to_keep >= 2 keeps the step they share).
Evaluation decodes every arm in one pass (per-row adapter ids) and scores the test loss of all
arms in one pass; latency is measured per arm on its own view (base, unmerged, merged).
"""

from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx, traverse_util

from eval.evaluators import EvalContext, run_evaluators
from lora_jax.errors import WorkdirError
from lora_jax.io.checkpoints import all_finite
from lora_jax.io.files import write_text_atomic
from lora_jax.run.assemble import (
    SHARED_DIR,
    build_bank_model,
    check_workdir_writable,
    data_iterators,
    dataset_counts,
    metric_writer,
    open_checkpoint_store,
    run_name,
    tokenizer_dir,
)
from lora_jax.run.config import arm_configs, lora_spec
from lora_jax.run.eval_hooks import completion_fn, latency_fn, loss_on_test_split
from lora_jax.run.summary import (
    diverged_summary,
    print_arms_progress,
    print_arms_summary,
    print_data_counts,
    run_summary,
    run_summary_fields,
)
from lora_jax.run.train_loop import StepTimer, step_events
from lora_jax.sharding import global_batch, make_mesh
from lora_jax.train import accounting
from lora_jax.train.divergence import DivergenceDetector, DivergenceError, DivergenceLimits, diverged_message
from lora_jax.train.step import adapter_norm
from lora_jax.train.trainer import build_trainer, export_adapter


def _common_step(stores) -> int:
    """The newest step every arm has finished (0: start fresh)."""
    steps = [set(s.manager.all_steps()) for s in stores]
    if not any(steps):
        return 0
    common = set.intersection(*steps)
    if not common:
        have = ", ".join(f"{s.dir}: {sorted(x) or 'none'}" for s, x in zip(stores, steps))
        raise WorkdirError(f"the arms' checkpoints share no step ({have}); resume each arm on its own or start afresh")
    return max(common)


def train_arms(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Trains config.arms jointly (resuming), evaluates and exports each arm; returns their summaries."""
    configs = arm_configs(config)
    root = epath.Path(workdir)
    check_workdir_writable(root)
    names = [c.arm for c in configs]
    workdirs = [root / run_name(c) for c in configs]
    shared = root / SHARED_DIR
    mesh = make_mesh(config.mesh.shape)
    model, fingerprint, views = build_bank_model(configs, names, mesh)
    stores = [open_checkpoint_store(c, w, fingerprint) for c, w in zip(configs, workdirs)]
    trainer = build_trainer(model, config, mesh)
    lora, frozen, opt_state = trainer.lora, trainer.frozen, trainer.opt_state
    batch_sh = trainer.batch_sharding
    data = data_iterators(config, shared, tokenizer_dir(config, shared), model.config.vocab_size, batch_sh)
    initial_norms = jax.device_get(jax.jit(adapter_norm, static_argnums=1)(lora, model.lora))  # [K], fresh init
    limits = DivergenceLimits.from_config(config)
    detectors = [DivergenceDetector(limits, n) for n in initial_norms]
    diverged = {}  # arm index -> its summary.json: a diverged arm stops alone, the others go on
    start = _common_step(stores)
    if start:
        targets = views.split(lora, opt_state)  # the arms' fresh states give the layout to restore onto
        restored = [s.restore(start, *targets[k]) for k, s in enumerate(stores)]
        lora, opt_state = views.stack(lora, opt_state, [(r[0], r[1]) for r in restored])
        data.train.set_state(restored[0][2])
        logging.info("resumed %d arms from step %d", len(stores), start)

    writers = [metric_writer(w) for w in workdirs]
    specs = [lora_spec(c) for c in configs]
    n_trainable = [sum(accounting.lora_params_per_target(model.config, s).values()) for s in specs]
    if start == 0:
        for c, w in zip(configs, writers):
            w.write_hparams({k: str(v) for k, v in traverse_util.flatten_dict(c.to_dict(), sep=".").items()})
    data_counts = dataset_counts(config, shared)
    print_data_counts(writers, data_counts)
    b, t = config.train.global_batch_size, config.data.max_seq_len
    flops = sum(accounting.train_flops_per_step(model.config, s, b, t) for s in specs)
    peak = accounting.measure_matmul_peak()

    def evaluate(step):
        """Every arm's evaluators; the test loss and the completions of all arms in one pass each."""
        cache = {"loss": None, "complete": {}}
        arm_loras = [x[0] for x in views.split(lora)]
        bank_model = lambda: nnx.merge(trainer.graphdef, lora, frozen)  # noqa: E731
        bank_complete = completion_fn(bank_model, data.tokenizer, data.sft_options, mesh, num_arms=len(configs))

        def eval_loss(k):
            if cache["loss"] is None:
                cache["loss"] = loss_on_test_split(
                    trainer.eval_step, lora, frozen, data.eval_iterator(), config, batch_sh
                )
            losses, truncated = cache["loss"]
            return float(losses[k]), truncated

        def complete(k, records, suite):
            key = (suite.name, len(records))
            if key not in cache["complete"]:
                cache["complete"][key] = bank_complete(records, suite)
            return cache["complete"][key][k]

        results = []
        for k, (c, w) in enumerate(zip(configs, workdirs)):
            if k in diverged:
                results.append(None)
                continue
            if jax.process_index() == 0:
                print(f"arm {c.arm}:", flush=True)
            final = step == config.train.total_steps
            adapter = str(w / "adapter") if final else str(w / "checkpoints" / str(step))
            arm_model = functools.partial(views.arm_model, k, arm_loras[k], frozen)
            ctx = EvalContext(
                config=c,
                workdir=w,
                writer=writers[k],
                sources=data.sources,
                complete=functools.partial(complete, k),
                eval_loss=functools.partial(eval_loss, k),
                adapter=adapter,
                adapter_source="training",
                write_text=write_text_atomic,
                latency=latency_fn(arm_model, c, model.config.max_position_embeddings),
            )
            results.append(run_evaluators(ctx, step))
        return results

    history, last = [[] for _ in configs], None
    timer = StepTimer()
    for step in range(start, config.train.total_steps):
        batch = global_batch(next(data.train), batch_sh, b)
        lora, opt_state, metrics = trainer.train_step(lora, opt_state, frozen, batch, step)
        done = step + 1
        timer.tick(metrics)
        is_log, is_ckpt, is_eval = step_events(config, done)
        if is_log or is_ckpt:
            last, newly = jax.device_get(metrics), []
            for k in range(len(configs)):
                if k in diverged or not (found := detectors[k].check(done, last["loss"][k], last["adapter_norm"][k])):
                    continue
                history[k].append((done, float(last["loss"][k])))
                fields = run_summary_fields(configs[k], specs[k], model.config, history[k], fingerprint, start)
                fields["joint"] = {"arms": names, "workdir": str(root)}
                diverged[k] = _stop_arm(found, stores[k], workdirs[k], names[k], fields)
                newly.append(k)
            if len(diverged) == len(configs):
                raise DivergenceError(
                    "every arm diverged: "
                    + "; ".join(f"{names[k]}: {s['divergence']['detail']}" for k, s in sorted(diverged.items()))
                )
            if newly:  # zero the diverged arms' adapters and moments: they stay zero (see _freeze_arms)
                lora, opt_state = _freeze_arms(views, lora, opt_state, set(newly))
        if is_log:
            step_s = timer.step_s()
            for k, w in enumerate(writers):
                if k in diverged:
                    continue
                scalars = {
                    "loss": float(last["loss"][k]),
                    "grad_norm": float(last["grad_norm"][k]),
                    "learning_rate": float(last["learning_rate"]),
                    "trainable_params": n_trainable[k],
                    "train_dropped_examples": data.train.dropped,
                }
                if step_s:  # the joint step: all K arms in one program
                    scalars.update(
                        joint_step_s=step_s, joint_mfu=accounting.mfu(flops, step_s, peak, jax.device_count())
                    )
                w.write_scalars(done, scalars)
                history[k].append((done, scalars["loss"]))
            losses = ["diverged" if k in diverged else v for k, v in enumerate(last["loss"])]
            print_arms_progress(done, config.train.total_steps, names, losses, step_s)
        if is_ckpt:
            if not all_finite(lora):
                raise FloatingPointError(f"non-finite LoRA weights at step {done}; not saving")
            data_state = data.train.get_state()
            with timer.paused(metrics):  # the blocking part of the orbax saves is not training time
                for k, (arm_lora, arm_opt) in enumerate(views.split(lora, opt_state)):
                    saved = done in stores[k].manager.all_steps()  # before a kill; the resumed run repeats it exactly
                    if k in diverged or saved:
                        continue
                    meta = {"loss": float(last["loss"][k]), "config": configs[k].to_json()}
                    stores[k].save(done, arm_lora, arm_opt, data_state, meta)
        if is_eval:
            with timer.paused(metrics):
                evaluate(done)
    for s in stores:
        s.wait()
    final_step = config.train.total_steps
    for k, (arm_lora, _) in enumerate(views.split(lora)):  # before evaluation: never lost to it
        if k not in diverged:
            export_adapter(views.graphdefs[k], arm_lora, frozen, workdirs[k], config.model.hf_dir or "", fingerprint)
    results = evaluate(final_step)
    summaries = []
    for k, (c, w) in enumerate(zip(configs, workdirs)):
        writers[k].flush()
        if k in diverged:
            summaries.append(diverged[k])
            continue
        summary = run_summary(
            c, specs[k], model.config, results[k], history[k], data.train.dropped, data_counts, fingerprint, start
        )
        summary["joint"] = {"arms": names, "workdir": str(root)}
        summaries.append(summary)
        if jax.process_index() == 0:
            (w / "summary.json").write_text(json.dumps(summary, indent=2))
    if jax.process_index() == 0:
        shared.mkdir(parents=True, exist_ok=True)
        joint = {"arms": names, "runs": [str(w) for w in workdirs], "diverged": [names[k] for k in sorted(diverged)]}
        (shared / "summary.json").write_text(json.dumps(joint, indent=2))
        print_arms_summary(root, names, workdirs, summaries)
    return summaries


def _stop_arm(found, store, workdir: epath.Path, name: str, fields: dict) -> dict:
    """A diverged arm of a joint run: its checkpoints so far are kept (the last one passed the check),
    summary.json records the divergence, one line says so; returns that summary. Nothing is exported."""
    store.wait()
    last_step = store.latest_step()
    summary = diverged_summary(found, last_step, fields)
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        last_dir = str(workdir / "checkpoints" / str(last_step)) if last_step else None
        print(f"arm {name}: {diverged_message(found, last_dir)}; the other arms go on", flush=True)
    return summary


def _freeze_arms(views, lora, opt_state, arms: set[int]):
    """The bank's state with the given arms' LoRA weights and optimizer moments set to zero. Such an arm
    then stays zero: with lora_a = lora_b = 0 both gradients are zero, and so are AdamW's moments and
    decay — its rows compute the base model and can no longer overflow into the others' checks."""
    zero = lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731 — not counters
    arms_state = views.split(lora, opt_state)
    arms_state = [jax.tree.map(zero, a) if k in arms else a for k, a in enumerate(arms_state)]
    return views.stack(lora, opt_state, arms_state)
