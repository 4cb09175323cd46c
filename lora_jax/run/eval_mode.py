"""mode=eval: score an adapter (or the base alone) without training.

What mode=eval scores, in this order:
  1. `eval.adapter_dir`: a PEFT adapter directory (ours, e.g. <workdir>/adapter, or one trained
     elsewhere with PEFT) on the config's base model, loaded in one call;
  2. else the latest checkpoint in --workdir (refused, naming what differs, if it belongs to
     another run — as a resumed training run would be);
  3. else nothing to load: the base model alone (the study's "base model" column), said on the
     console and recorded in the results (`adapter: null`).
Results: `<workdir>/eval/<suite>.json` (see eval/evaluators.py), `<workdir>/eval/results.json` with
every evaluator's aggregate, TensorBoard scalars and sample texts in --workdir.

Like train_loop.py, this is an orchestrator: it builds the model and the data (assemble.py) and
hands eval/ plain functions (eval_hooks.py: test loss, completions, latency).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from eval.evaluators import EvalContext, run_evaluators
from lora_jax.errors import CheckpointError
from lora_jax.io.files import write_text_atomic
from lora_jax.io.peft_adapter import adapter_fits, check_adapter_base, read_peft_adapter, with_adapter
from lora_jax.lora.arms import ARMS, arm_name, validate_targets
from lora_jax.multihost import decided_on_process_0
from lora_jax.run.assemble import (
    base_fingerprint,
    data_iterators,
    image_inputs,
    metric_writer,
    open_checkpoint_store,
    prepare_planted,
    start_run,
    tokenizer_dir,
)
from lora_jax.run.config import lora_spec, model_config_of, runtime_options, validate
from lora_jax.run.eval_hooks import completion_fn, latency_fn, loss_on_test_split
from lora_jax.train.trainer import build_trainer


def _zero_adapters(model) -> None:
    """B = 0: the adapters add exactly nothing, so the model computes the base model's outputs."""
    model = getattr(model, "language", model)  # LLaVA: the adapters are on the decoder
    for target in model.lora.targets if model.lora else ():
        b = getattr(model.layers, target).lora_b
        b.set_value(jnp.zeros_like(b.get_value()))


def labelled_config(config, model):
    """`config` as the scored adapters label it (arm and lora.targets): the model's own targets and
    their study arm (`arm_name`), so that an adapter (eval.adapter_dir) on other targets than
    config.arm's is filed under its own arm. A config.arm outside the study's arms is kept as the
    label of the config's own targets."""
    spec = getattr(model, "language", model).lora  # a Llava's adapters are on its decoder
    if spec is None:
        return config
    own = config.arm not in ARMS and spec.targets == validate_targets(config.lora.targets)
    arm = config.arm if own else arm_name(spec.targets)
    if arm == config.arm and spec.targets == tuple(config.lora.targets):
        return config
    label = ml_collections.ConfigDict(config.to_dict())
    label.arm, label.lora.targets = arm, tuple(spec.targets)
    return label


def check_eval_adapter(config) -> None:
    """eval.adapter_dir, checked without building the model: its lora_jax_base.json (if any) names this
    run's base; its files read as a PEFT adapter of the base's shape (`read_peft_adapter`); and on a
    random base (no model.hf_dir to load again with the adapter's shapes) it fits the config's own
    adapter slots: the same targets, layers, ranks and scales (what `with_adapter` requires)."""
    adapter_dir = str(config.eval.adapter_dir)
    check_adapter_base(adapter_dir, base_fingerprint(config))
    own = lora_spec(config)
    spec, _ = read_peft_adapter(adapter_dir, model_config_of(config), own)
    if config.model.hf_dir:
        return
    if not adapter_fits(spec, own):
        raise CheckpointError(
            f"{adapter_dir}: adapter on {spec.targets} does not fit the model (targets {own.targets}, "
            f"lora.rank={own.rank}, lora.alpha={own.alpha}); a randomly initialised base can only take an adapter "
            "of the config's own arm"
        )


def evaluate(config, workdir: str) -> dict:
    """Loads what mode=eval scores (see the module docstring) and runs the evaluators once."""

    if config.eval.adapter_dir:  # an adapter that cannot be scored is refused before anything is written
        validate(config)
        check_eval_adapter(config)
    workdir, mesh, model, fingerprint = start_run(config, workdir)
    step, adapter, source = 0, None, "base"
    if config.eval.adapter_dir:
        model = with_adapter(model, config.eval.adapter_dir, config.model.hf_dir, runtime_options(config), mesh)
        adapter, source = str(config.eval.adapter_dir), "peft"
    elif decided_on_process_0(lambda: "yes" if (workdir / "checkpoints").exists() else ""):
        store = open_checkpoint_store(config, workdir, fingerprint)
        step = store.latest_step() or 0
        if step:
            adapter, source = str(workdir / "checkpoints" / str(step)), "checkpoint"
    if source == "base":
        _zero_adapters(model)
        if jax.process_index() == 0:
            print(f"no adapter in {workdir} and no eval.adapter_dir: scoring the base model alone", flush=True)
    trainer = build_trainer(model, config, mesh)
    lora, frozen, batch_sh = trainer.lora, trainer.frozen, trainer.batch_sharding
    if source == "checkpoint":
        lora, _, _, _ = store.restore(step, trainer.lora, trainer.opt_state)
    images = image_inputs(model, config)
    prepare_planted(config, workdir, mesh)  # a planted study's teacher data, before its tokenizer
    data = data_iterators(config, workdir, tokenizer_dir(config, workdir), model.config.vocab_size, batch_sh, images)
    writer = metric_writer(workdir)
    label = labelled_config(config, model)
    ctx = EvalContext(
        config=label,
        workdir=workdir,
        writer=writer,
        sources=data.sources,
        complete=completion_fn(
            lambda: nnx.merge(trainer.graphdef, lora, frozen), data.tokenizer, data.sft_options, mesh
        ),
        eval_loss=lambda: loss_on_test_split(trainer.eval_step, lora, frozen, data.eval_iterator(), config, batch_sh),
        adapter=adapter,
        adapter_source=source,
        write_text=write_text_atomic,
        latency=latency_fn(
            lambda: nnx.merge(trainer.graphdef, lora, frozen), config, model.config.max_position_embeddings
        ),
    )
    results = dict(run_evaluators(ctx, step), adapter=adapter, adapter_source=source, step=step)
    results.update(
        dataset=config.data.name,
        arm=label.arm,
        targets=list(label.lora.targets),
        seed=config.train.seed,
        base_model=fingerprint,
    )
    writer.close()
    if jax.process_index() == 0:
        (workdir / "eval").mkdir(parents=True, exist_ok=True)
        write_text_atomic(workdir / "eval" / "results.json", json.dumps(results, indent=1))
        print(f"results: {workdir / 'eval'}", flush=True)
    return results
