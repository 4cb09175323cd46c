"""The orchestrator: config -> data -> model -> sharded LoRA training -> checkpoints, TensorBoard, PEFT export."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import time

import jax
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from lora_jax import accounting
from lora_jax.checkpointing import CheckpointStore, WorkdirMismatchError, all_finite
from lora_jax.errors import WorkdirError
from lora_jax.hf_checkpoint import HFCheckpoint, load_hf_model
from lora_jax.model import Transformer
from lora_jax.peft_io import export_peft
from lora_jax.run_config import (  # noqa: F401 — re-exported: train.lora_spec etc. are the public names
    RESUMABLE_CHANGES,
    check_hf_conflicts,
    check_workdir_writable,
    lora_spec,
    random_model_config,
    runtime_options,
    validate,
)
from lora_jax.safetensors_io import write_text_atomic
from lora_jax.sharding import batch_sharding, make_mesh, shard_model
from lora_jax.train_step import StepOptions, make_eval_step, make_optimizer, make_train_step

# -- building a run ------------------------------------------------------------------------------


def build_model(config, mesh) -> tuple[Transformer, str]:
    """The model (base weights + fresh adapters) on `mesh`, and a fingerprint of its base. Writes nothing."""
    spec, opts = lora_spec(config), runtime_options(config)
    if config.model.hf_dir:
        ckpt = HFCheckpoint(config.model.hf_dir)
        check_hf_conflicts(config, ckpt.config, config.model.hf_dir)
        model = load_hf_model(config.model.hf_dir, spec, opts, mesh, seed=config.train.seed, ckpt=ckpt)
        fingerprint = ckpt.fingerprint()
    else:
        cfg = random_model_config(config)
        model = Transformer(cfg, spec, opts, rngs=nnx.Rngs(config.train.seed))
        shard_model(model, mesh)
        fingerprint = (
            "random-" + hashlib.sha256(f"{cfg}{config.train.seed}{opts.param_dtype}".encode()).hexdigest()[:16]
        )
    return model, fingerprint


def tokenizer_dir(config, workdir: epath.Path) -> str:
    """data.tokenizer_dir, else model.hf_dir, else (random model) the bundled tiny tokenizer written to
    workdir (by process 0; the others wait for it)."""
    tok_dir = config.data.tokenizer_dir or config.model.hf_dir
    if tok_dir is None:  # a random model (runlocal): the tiny byte-level tokenizer its vocab was sized for
        from data import samples

        tok_dir = workdir / "bundled" / "tokenizer"
        _on_process_0_then_all(lambda: samples.write_tiny_tokenizer(tok_dir), "bundled tokenizer")
    return str(tok_dir)


def _on_process_0_then_all(write, what: str) -> None:
    """Process 0 writes shared files; the others wait until it is done (never two writers of one file)."""
    if jax.process_index() == 0:
        write()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"written: {what}")


def manual_dir(config, workdir: epath.Path) -> str:
    """data.manual_dir, or (runlocal) where the bundled samples go."""
    d = config.data
    if d.manual_dir is None and d.use_bundled_samples:
        return str(workdir / "bundled" / d.name)
    return d.manual_dir


def data_source_manifest(config) -> dict | None:
    """What the run's dataset is built from (files, sizes, mtimes, builder options); None for the bundled
    runlocal samples, which data/samples.py writes deterministically. Reads only."""
    from data.prepare import source_manifest

    d = config.data
    if d.manual_dir is None and d.use_bundled_samples:
        return None
    return source_manifest(d.name, d.manual_dir, bad_images=d.bad_images)


def run_identity(config, fingerprint: str, data_source: str) -> dict:
    """What a checkpoint must agree with to be resumed: the adapters' shape, the base, the data and the
    schedule (a resumed run must see the batches and learning rates an uninterrupted one would)."""
    spec = lora_spec(config)
    identity = {
        "arm": config.arm,
        "targets": list(spec.targets),
        "lora": {
            "rank": spec.rank,
            "alpha": spec.alpha,
            "use_rslora": spec.use_rslora,
            "rank_overrides": dict(spec.rank_overrides),
            "alpha_overrides": dict(spec.alpha_overrides),
        },
        "base_fingerprint": fingerprint,
        "dataset": config.data.name,
        "data_source": data_source,
    }
    for key in RESUMABLE_CHANGES:
        if "." in key:
            section, name = key.split(".")
            identity[key] = config[section][name]
    return json.loads(json.dumps(identity))  # as it reads back from the checkpoint's JSON


def data_iterators(config, workdir: epath.Path, tokenizer_dir: str, vocab_size: int, sharding):
    """(train iterator, eval-iterator factory).

    Process 0 prepares the tfds dataset; the others wait. Each process materialises exactly the
    global batch rows its devices hold under the batch `sharding`."""
    from jax.experimental import multihost_utils

    from data import samples
    from data.pipeline import PackedBatchIterator
    from data.prepare import open_sources, prepare
    from data.sft import SFTOptions
    from data.tokenizer import Tokenizer

    d = config.data
    manual = manual_dir(config, workdir)
    if d.manual_dir is None and d.use_bundled_samples:
        _on_process_0_then_all(lambda: samples.write_sample_manual_dir(d.name, manual), "bundled samples")
    data_dir = d.data_dir or str(workdir / "tfds")
    if jax.process_index() == 0:
        prepare(d.name, manual, data_dir, bad_images=d.bad_images)
    multihost_utils.sync_global_devices("tfds prepared")
    sources = open_sources(d.name, data_dir, bad_images=d.bad_images)
    tok = Tokenizer(tokenizer_dir, reasoning_traces=d.reasoning_traces, render_date=d.render_date)
    opts = SFTOptions(d.max_seq_len, d.max_target_tokens, d.truncation, d.reasoning_traces, vocab_size)
    eval_opts = dataclasses.replace(opts, keep_all=True)  # evaluation never drops an example
    b_train, b_eval = config.train.global_batch_size, config.eval.batch_size
    train_rows, eval_rows = process_rows(sharding, b_train), process_rows(sharding, b_eval)
    train = PackedBatchIterator(
        sources["train"], tok, opts, b_train, seed=config.train.seed, pack=d.pack, rows=train_rows
    )

    def eval_iterator():
        return PackedBatchIterator(sources["test"], tok, eval_opts, b_eval, train=False, pack=d.pack, rows=eval_rows)

    return train, eval_iterator


def dataset_counts(config, workdir: epath.Path) -> dict[str, int]:
    """What the dataset builder dropped, kept or de-duplicated (its info metadata counts)."""
    from data.prepare import builder_class

    d = config.data
    builder = builder_class(d.name)(data_dir=d.data_dir or str(workdir / "tfds"), bad_images=d.bad_images)
    return {k: int(v) for k, v in builder.info.metadata.items() if isinstance(v, (int, float))}


def process_rows(sharding, global_batch_size: int) -> list[int]:
    """The global batch rows this process's devices hold under `sharding` (all rows when replicated)."""
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size, 1)).values():
        rows.update(range(*index[0].indices(global_batch_size)))
    return sorted(rows)


def global_batch(local: dict, sharding, size: int | None = None) -> dict:
    """Host arrays holding this process's rows of a batch of `size` rows (default: all of them, one
    process) -> global arrays on `sharding`. The rows are those `process_rows` gives for the sharding,
    so this is right for any mesh, also when the batch is replicated across processes."""
    size = size or next(iter(local.values())).shape[0]
    return {k: jax.make_array_from_process_local_data(sharding, v, (size,) + v.shape[1:]) for k, v in local.items()}


def _metric_writer(workdir: epath.Path):
    from clu import metric_writers

    return metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)


def export_adapter(graphdef, lora, frozen, workdir: epath.Path, base_name: str) -> None:
    """PEFT adapter to <workdir>/adapter, written to a temporary dir and renamed.

    Every process joins the all-gather of the (possibly sharded over hosts) LoRA arrays; process 0
    alone writes."""
    from jax.experimental import multihost_utils

    lora_host = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), lora)
    if jax.process_index() != 0:
        return
    model = nnx.merge(graphdef, lora_host, frozen)
    workdir = epath.Path(workdir)
    final, tmp = workdir / "adapter", workdir / "adapter.tmp"
    try:
        if tmp.exists():
            tmp.rmtree()
        export_peft(model, str(tmp), base_name)
        if final.exists():
            old = workdir / "adapter.old"
            final.rename(old)
            tmp.rename(final)
            old.rmtree()
        else:
            tmp.rename(final)
    except OSError as e:  # a full or read-only disk: leave no half-written adapter behind
        if tmp.exists():
            tmp.rmtree()
        raise WorkdirError(f"{tmp}: writing the adapter failed ({e.strerror or e}); checkpoints are kept") from e


@dataclasses.dataclass
class Trainer:
    graphdef: object
    lora: object
    frozen: object
    opt_state: object
    train_step: object  # jitted (lora, opt_state, frozen, batch, step) -> (lora, opt_state, metrics)
    eval_step: object  # jitted (lora, frozen, batch) -> {"nll_sum", "target_tokens"}
    batch_sharding: object


def build_trainer(model: Transformer, config: ml_collections.ConfigDict, mesh) -> Trainer:
    """Splits the model into LoRA / frozen states and jits the steps with explicit shardings on `mesh`."""
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    o = config.optim
    tx, schedule = make_optimizer(
        o.learning_rate, o.warmup_steps, config.train.total_steps, o.weight_decay, o.grad_clip_norm
    )
    # Explicit out_shardings: moments like their LoRA leaf, everything else (the step counter)
    # replicated — left to itself it lands on one device and clashes in jit ("incompatible devices").
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    lora_leaf_sh = jax.tree.map(lambda x: x.sharding, lora)
    opt_out_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, jax.eval_shape(tx.init, lora), lora_leaf_sh, transform_non_params=lambda _: replicated
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_out_sh)(lora)
    step_opts = StepOptions(
        o.grad_accum_steps,
        config.train.loss_chunk_tokens,
        config.train.seed,
        use_dropout=model.lora is not None and model.lora.dropout > 0,
    )
    shard_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    lora_sh, opt_sh, frozen_sh, batch_sh = shard_of(lora), shard_of(opt_state), shard_of(frozen), batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(graphdef, tx, step_opts, schedule, mesh),
        in_shardings=(lora_sh, opt_sh, frozen_sh, batch_sh, None),
        out_shardings=(lora_sh, opt_sh, None),
        donate_argnums=(0, 1),
    )
    eval_step = jax.jit(
        make_eval_step(graphdef, config.train.loss_chunk_tokens, mesh), in_shardings=(lora_sh, frozen_sh, batch_sh)
    )
    return Trainer(graphdef, lora, frozen, opt_state, train_step, eval_step, batch_sh)


# -- the loop ------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from the latest checkpoint in workdir), evaluates, exports the adapter."""
    validate(config)
    workdir = epath.Path(workdir)
    check_workdir_writable(workdir)
    mesh = make_mesh(config.mesh.shape)
    model, fingerprint = build_model(config, mesh)
    spec = model.lora
    from data.prepare import describe_change, manifest_digest

    source = data_source_manifest(config)
    identity = run_identity(config, fingerprint, manifest_digest(source) if source else f"bundled:{config.data.name}")
    # Refuses a foreign workdir (or changed settings) before anything is written.
    try:
        store = CheckpointStore(
            str(workdir),
            config.train.max_to_keep,
            identity,
            allowed_changes=tuple(config.train.allow_changed_on_resume),
        )
    except WorkdirMismatchError as e:
        recorded = workdir / "data_source.json"
        if "data_source" in e.keys and source and recorded.exists():
            change = describe_change(json.loads(recorded.read_text()), source)
            raise WorkdirMismatchError(f"{e} [data.manual_dir: {change}]", e.keys) from None
        raise
    if source and jax.process_index() == 0:
        write_text_atomic(workdir / "data_source.json", json.dumps(source, indent=1))
    tok_dir = tokenizer_dir(config, workdir)

    trainer = build_trainer(model, config, mesh)
    graphdef, lora, frozen, opt_state = trainer.graphdef, trainer.lora, trainer.frozen, trainer.opt_state
    train_step, eval_step, batch_sh = trainer.train_step, trainer.eval_step, trainer.batch_sharding
    train_iter, eval_iterator = data_iterators(config, workdir, tok_dir, model.config.vocab_size, batch_sh)

    start = store.latest_step() or 0
    if start:
        lora, opt_state, data_state, _ = store.restore(start, lora, opt_state)
        train_iter.set_state(data_state)
        logging.info("resumed from step %d", start)

    writer = _metric_writer(workdir)
    n_trainable = sum(accounting.lora_params_per_target(model.config, spec).values())
    if start == 0:
        writer.write_hparams({k: str(v) for k, v in _flatten(config.to_dict()).items()})
    b, t = config.train.global_batch_size, config.data.max_seq_len
    flops_per_step = accounting.train_flops_per_step(model.config, spec, b, t)
    peak = accounting.measure_matmul_peak()
    from clu import periodic_actions

    progress = periodic_actions.ReportProgress(num_train_steps=config.train.total_steps, writer=writer)

    data_counts = dataset_counts(config, workdir)
    if data_counts and jax.process_index() == 0:
        writer.write_scalars(0, {f"data/{k}": v for k, v in data_counts.items()})
        print("data: " + ", ".join(f"{k} {v}" for k, v in data_counts.items()), flush=True)

    def evaluate(step):
        totals, it = np.zeros(2), eval_iterator()
        for i, local in enumerate(it):
            if config.eval.max_eval_batches and i >= config.eval.max_eval_batches:
                break
            out = eval_step(lora, frozen, global_batch(local, batch_sh, config.eval.batch_size))
            totals += [float(out["nll_sum"]), float(out["target_tokens"])]
        loss = totals[0] / max(totals[1], 1.0)
        writer.write_scalars(step, {"eval_loss": loss, "eval_truncated_targets": it.truncated_targets})
        return loss, it.truncated_targets

    history, metrics, last = [], None, None
    timer_start, timed_steps = None, 0
    counts = []  # (target, real) token counts of the steps since the last log, on device until then
    for step in range(start, config.train.total_steps):
        batch = global_batch(next(train_iter), batch_sh, b)
        lora, opt_state, metrics = train_step(lora, opt_state, frozen, batch, step)
        done = step + 1
        if timer_start is None:  # the first step compiles: time from the second on
            jax.block_until_ready(metrics)
            timer_start, timed_steps = time.perf_counter(), 0
        else:
            timed_steps += 1
        counts.append((metrics["target_tokens"], metrics["real_tokens"]))
        progress(done)
        is_log = done % config.train.log_every_steps == 0 or done == config.train.total_steps
        is_ckpt = done % config.train.checkpoint_every_steps == 0 or done == config.train.total_steps
        if is_log or is_ckpt:
            last = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(last["loss"]):
                raise FloatingPointError(f"non-finite loss {last['loss']} at step {done}; stopping (nothing saved)")
        if is_log:
            elapsed = time.perf_counter() - timer_start
            scalars = dict(last, trainable_params=n_trainable, train_dropped_examples=train_iter.dropped)
            targets, real = np.mean(jax.device_get(counts), axis=0)
            counts = []
            if timed_steps:
                step_s = elapsed / timed_steps
                scalars.update(
                    tokens_per_s=b * t / step_s,  # padded rows x length: what the hardware processed
                    real_tokens_per_s=real / step_s,  # without padding
                    target_tokens_per_s=targets / step_s,  # tokens in the loss
                    step_s=step_s,
                    mfu=accounting.mfu(flops_per_step, step_s, peak, jax.device_count()),
                )
            writer.write_scalars(done, scalars)
            history.append((done, last["loss"]))
            _print_progress(done, config.train.total_steps, scalars)
        if is_ckpt:
            if not all_finite(lora):
                raise FloatingPointError(f"non-finite LoRA weights at step {done}; not saving")
            store.save(
                done, lora, opt_state, train_iter.get_state(), {"loss": last["loss"], "config": config.to_json()}
            )
        if config.eval.eval_every_steps and done % config.eval.eval_every_steps == 0:
            evaluate(done)
    store.wait()
    final_step = config.train.total_steps
    eval_loss, eval_truncated = evaluate(final_step)
    export_adapter(graphdef, lora, frozen, workdir, config.model.hf_dir or "")
    writer.flush()
    summary = {
        "final_step": final_step,
        "train_loss_history": history,
        "eval_loss": eval_loss,
        "eval_truncated_targets": eval_truncated,
        "train_dropped_examples": train_iter.dropped,
        "data_counts": data_counts,
        "trainable_params": n_trainable,
        "resumed_from": start,
    }
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _print_progress(done: int, total: int, scalars: dict) -> None:
    """One console line per log interval (process 0)."""
    if jax.process_index() != 0:
        return
    line = f"step {done}/{total}  loss {scalars['loss']:.4f}"
    if "step_s" in scalars:
        eta = datetime.timedelta(seconds=round(scalars["step_s"] * (total - done)))
        line += f"  {scalars['real_tokens_per_s']:,.0f} tok/s  MFU {scalars['mfu']:.1%}  ETA {eta}"
    print(line, flush=True)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
