"""The training loop: config -> data -> model -> sharded LoRA training -> checkpoints, TensorBoard,
evaluation suites, PEFT export. The parts live in assemble.py (building), train/trainer.py (state and
steps) and eval/ (evaluators); this module only runs them in order."""

from __future__ import annotations

import contextlib
import json
import logging
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx, traverse_util

from eval.evaluators import EvalContext, run_evaluators
from lora_jax.io.checkpoints import all_finite
from lora_jax.io.files import write_text_atomic
from lora_jax.run.assemble import (
    data_iterators,
    dataset_counts,
    image_inputs,
    metric_writer,
    open_checkpoint_store,
    start_run,
    tokenizer_dir,
)
from lora_jax.run.eval_hooks import completion_fn, latency_fn, loss_on_test_split
from lora_jax.run.summary import (
    diverged_summary,
    print_data_counts,
    print_progress,
    print_summary,
    run_summary,
    run_summary_fields,
)
from lora_jax.sharding import global_batch
from lora_jax.train import accounting
from lora_jax.train.divergence import DivergenceDetector, DivergenceError, DivergenceLimits, diverged_message
from lora_jax.train.step import adapter_norm
from lora_jax.train.trainer import build_trainer, export_adapter

# -- the loop ------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from the latest checkpoint in workdir), evaluates, exports the adapter."""
    workdir, mesh, model, fingerprint = start_run(config, workdir)
    spec = model.lora
    store = open_checkpoint_store(config, workdir, fingerprint)  # refuses a foreign workdir before any write
    tok_dir = tokenizer_dir(config, workdir)

    trainer = build_trainer(model, config, mesh)
    graphdef, lora, frozen, opt_state = trainer.graphdef, trainer.lora, trainer.frozen, trainer.opt_state
    train_step, batch_sh = trainer.train_step, trainer.batch_sharding
    data = data_iterators(config, workdir, tok_dir, model.config.vocab_size, batch_sh, image_inputs(model, config))
    train_iter = data.train

    detector = DivergenceDetector(DivergenceLimits.from_config(config), float(jax.jit(adapter_norm)(lora)))
    start = store.latest_step() or 0
    if start:
        lora, opt_state, data_state, _ = store.restore(start, lora, opt_state)
        train_iter.set_state(data_state)
        logging.info("resumed from step %d", start)

    writer = metric_writer(workdir)
    n_trainable = sum(accounting.lora_params_per_target(model.config, spec).values())
    if start == 0:
        writer.write_hparams({k: str(v) for k, v in traverse_util.flatten_dict(config.to_dict(), sep=".").items()})
    b, t = config.train.global_batch_size, config.data.max_seq_len
    flops_per_step = accounting.train_flops_per_step(model.config, spec, b, t)
    peak = accounting.measure_matmul_peak()
    from clu import periodic_actions

    progress = periodic_actions.ReportProgress(num_train_steps=config.train.total_steps, writer=writer)

    data_counts = dataset_counts(config, workdir)
    print_data_counts([writer], data_counts)

    def eval_loss():
        return loss_on_test_split(trainer.eval_step, lora, frozen, data.eval_iterator(), config, batch_sh)

    complete = completion_fn(lambda: nnx.merge(graphdef, lora, frozen), data.tokenizer, data.sft_options, mesh)
    latency = latency_fn(lambda: nnx.merge(graphdef, lora, frozen), config, model.config.max_position_embeddings)

    def evaluate(step):
        final = step == config.train.total_steps
        adapter = str(workdir / "adapter") if final else str(workdir / "checkpoints" / str(step))
        ctx = EvalContext(
            config=config,
            workdir=workdir,
            writer=writer,
            sources=data.sources,
            complete=complete,
            eval_loss=eval_loss,
            adapter=adapter,
            adapter_source="training",
            write_text=write_text_atomic,
            latency=latency,
        )
        return run_evaluators(ctx, step)

    history, metrics, last = [], None, None
    timer = StepTimer()
    counts = []  # (target, real) token counts of the steps since the last log, on device until then
    for step in range(start, config.train.total_steps):
        batch = global_batch(next(train_iter), batch_sh, b)
        lora, opt_state, metrics = train_step(lora, opt_state, frozen, batch, step)
        done = step + 1
        timer.tick(metrics)
        counts.append((metrics["target_tokens"], metrics["real_tokens"]))
        progress(done)
        is_log, is_ckpt, is_eval = step_events(config, done)
        if is_log or is_ckpt:
            last = {k: float(v) for k, v in jax.device_get(metrics).items()}
            found = detector.check(done, last["loss"], last["adapter_norm"])
            if found:  # before this step's checkpoint: every saved step passed the check
                history.append((done, last["loss"]))
                fields = run_summary_fields(config, spec, model.config, history, fingerprint, start)
                stop_diverged(found, store, workdir, fields)
        if is_log:
            scalars = dict(last, trainable_params=n_trainable, train_dropped_examples=train_iter.dropped)
            targets, real = np.mean(jax.device_get(counts), axis=0)
            counts = []
            step_s = timer.step_s()
            if step_s:
                scalars.update(
                    tokens_per_s=b * t / step_s,  # padded rows x length: what the hardware processed
                    real_tokens_per_s=real / step_s,  # without padding
                    target_tokens_per_s=targets / step_s,  # tokens in the loss
                    step_s=step_s,
                    mfu=accounting.mfu(flops_per_step, step_s, peak, jax.device_count()),
                )
            writer.write_scalars(done, scalars)
            history.append((done, last["loss"]))
            print_progress(done, config.train.total_steps, scalars)
        if is_ckpt:
            if not all_finite(lora):
                raise FloatingPointError(f"non-finite LoRA weights at step {done}; not saving")
            with timer.paused(metrics):  # the blocking part of an orbax save is not training time
                store.save(
                    done, lora, opt_state, train_iter.get_state(), {"loss": last["loss"], "config": config.to_json()}
                )
        if is_eval:
            with timer.paused(metrics), progress.timed("eval"):
                evaluate(done)
    store.wait()
    final_step = config.train.total_steps
    export_adapter(
        graphdef, lora, frozen, workdir, config.model.hf_dir or "", fingerprint
    )  # before evaluation: never lost to it
    results = evaluate(final_step)
    writer.flush()
    summary = run_summary(
        config, spec, model.config, results, history, train_iter.dropped, data_counts, fingerprint, start
    )
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(workdir, summary)
    return summary


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


def stop_diverged(found, store, workdir: epath.Path, fields: dict) -> None:
    """Ends a diverged run: waits for the checkpoints already being written (the last one before the
    divergence is kept), records the divergence in summary.json, exports nothing, raises DivergenceError."""
    store.wait()
    last_step = store.latest_step()
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(diverged_summary(found, last_step, fields), indent=2))
    raise DivergenceError(diverged_message(found, str(workdir / "checkpoints" / str(last_step)) if last_step else None))


def step_events(config, done: int) -> tuple[bool, bool, bool]:
    """(log, checkpoint, intermediate evaluation) after `done` steps; the last step logs and saves."""
    total = config.train.total_steps
    is_log = done % config.train.log_every_steps == 0 or done == total
    is_ckpt = done % config.train.checkpoint_every_steps == 0 or done == total
    every = config.eval.eval_every_steps
    return is_log, is_ckpt, bool(every and done % every == 0 and done < total)
