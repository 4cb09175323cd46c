"""mode=eval: score an adapter, or the base model, with the configured evaluators.

What is scored, in this order:
  1. `eval.adapter_dir`: a PEFT adapter directory (ours, e.g. <workdir>/adapter, or one trained
     elsewhere with PEFT) on the config's base model;
  2. else the latest checkpoint in --workdir (refused, naming what differs, if it belongs to
     another run — as a resumed training run would be);
  3. else nothing to load: the base model alone (the study's "base model" column), said on the
     console and recorded in the results.
Results: `<workdir>/eval/<suite>.json` (see eval/evaluators.py), `<workdir>/eval/results.json`
with every evaluator's aggregate, and TensorBoard scalars and sample texts in --workdir.
"""

from __future__ import annotations

import json

import jax
from etils import epath
from flax import nnx

from eval.evaluators import EvalContext, check_evaluators, run_evaluators
from lora_jax.assemble import build_model, data_iterators, open_checkpoint_store, tokenizer_dir
from lora_jax.multihost import decided_on_process_0
from lora_jax.peft_io import with_adapter
from lora_jax.run_config import check_workdir_writable, runtime_options, validate
from lora_jax.safetensors_io import write_text_atomic
from lora_jax.sharding import make_mesh
from lora_jax.trainer import build_trainer


def _zero_adapters(model) -> None:
    """B = 0: the adapters add exactly nothing, so the model computes the base model's outputs."""
    for target in model.lora.targets if model.lora else ():
        b = getattr(model.layers, target).lora_b
        b.set_value(jax.numpy.zeros_like(b.get_value()))


def evaluate(config, workdir: str) -> dict:
    """Loads what mode=eval scores (see the module docstring), runs the evaluators once."""
    from lora_jax.train import _metric_writer, loss_on_test_split

    validate(config)
    check_evaluators(config)
    workdir = epath.Path(workdir)
    check_workdir_writable(workdir)
    mesh = make_mesh(config.mesh.shape)
    model, fingerprint = build_model(config, mesh)
    step, adapter = 0, "none (base model)"
    if config.eval.adapter_dir:
        model = with_adapter(model, config.eval.adapter_dir, config.model.hf_dir, runtime_options(config), mesh)
        adapter = f"PEFT adapter {config.eval.adapter_dir}"
    elif decided_on_process_0(lambda: "yes" if (workdir / "checkpoints").exists() else ""):
        store = open_checkpoint_store(config, workdir, fingerprint)
        step = store.latest_step() or 0
        if step:
            adapter = f"checkpoint step {step} in {workdir}"
    if adapter.startswith("none"):
        _zero_adapters(model)
        if jax.process_index() == 0:
            print(f"no adapter in {workdir} and no eval.adapter_dir: scoring the base model alone", flush=True)
    trainer = build_trainer(model, config, mesh)
    lora, frozen = trainer.lora, trainer.frozen
    if adapter.startswith("checkpoint"):
        lora, _, _, _ = store.restore(step, trainer.lora, trainer.opt_state)
    data = data_iterators(
        config, workdir, tokenizer_dir(config, workdir), model.config.vocab_size, trainer.batch_sharding
    )
    writer = _metric_writer(workdir)

    def eval_loss():
        return loss_on_test_split(trainer.eval_step, lora, frozen, data.eval_iterator(), config, trainer.batch_sharding)

    ctx = EvalContext(
        config, workdir, writer, data, lambda: nnx.merge(trainer.graphdef, lora, frozen), eval_loss, adapter, mesh
    )
    results = dict(run_evaluators(ctx, step), adapter=adapter, step=step)
    writer.flush()
    if jax.process_index() == 0:
        (workdir / "eval").mkdir(parents=True, exist_ok=True)
        write_text_atomic(workdir / "eval" / "results.json", json.dumps(results, indent=1))
        print(f"results: {workdir / 'eval'}", flush=True)
    return results
