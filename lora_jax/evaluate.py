"""mode=eval, and the completion function every generation suite uses.

What mode=eval scores, in this order:
  1. `eval.adapter_dir`: a PEFT adapter directory (ours, e.g. <workdir>/adapter, or one trained
     elsewhere with PEFT) on the config's base model, loaded in one call;
  2. else the latest checkpoint in --workdir (refused, naming what differs, if it belongs to
     another run — as a resumed training run would be);
  3. else nothing to load: the base model alone (the study's "base model" column), said on the
     console and recorded in the results (`adapter: null`).
Results: `<workdir>/eval/<suite>.json` (see eval/evaluators.py), `<workdir>/eval/results.json` with
every evaluator's aggregate, TensorBoard scalars and sample texts in --workdir.

Like train.py, this is an orchestrator: it builds the model and the data and hands eval/ plain
functions (test loss, completions).
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from data.sft import SFTOptions, example_pixels, generation_prompt_ids, prompt_opens_think
from data.tokenizer import Tokenizer
from eval.evaluators import EvalContext, run_evaluators
from eval.generation_suite import Completion
from lora_jax import latency
from lora_jax.assemble import base_fingerprint, data_iterators, image_inputs, open_checkpoint_store, tokenizer_dir
from lora_jax.errors import CheckpointError
from lora_jax.generate import GenerationOptions, complete
from lora_jax.lora import ARMS, validate_targets
from lora_jax.multihost import decided_on_process_0
from lora_jax.peft_io import check_adapter_base, read_peft_adapter, with_adapter
from lora_jax.run_config import arm_name, check_latency, lora_spec, model_config_of, runtime_options, validate
from lora_jax.safetensors_io import write_text_atomic
from lora_jax.sharding import check_serving_mesh
from lora_jax.trainer import build_trainer

PAD_MULTIPLE = 64  # prompt lengths are bucketed so that few shapes compile


def stop_ids(tok: Tokenizer) -> tuple[int, ...]:
    """The chat template's end-of-turn token and EOS: a row stops at either."""
    ids = {tok.end_of_turn_id}
    eos = tok.special_tokens.get("eos_token")
    if eos:
        ids.add(tok.token_id(eos))
    return tuple(sorted(ids))


def completion_fn(model_fn, tok: Tokenizer, sft: SFTOptions, mesh=None, seed: int = 0, num_arms: int = 0):
    """(records, suite) -> [Completion(prompt tokens, reply, think_opened) or None]: greedy (or the
    suite's temperature) batched decoding of the model `model_fn()` returns, from prompts rendered and
    cut exactly as training renders the generation prompt so that prompt + max_new_tokens fit
    min(data.max_seq_len, the model's context); None where even the cut prompt cannot fit.
    think_opened: the template's generation prompt opens a `<think>` trace (data/sft.py
    `prompt_opens_think`), so each reply starts inside it and the scorer needs its `</think>`.

    num_arms = K > 0: `model_fn()` is a bank model and the result is one such list per arm, all
    decoded in one pass (each prompt once per arm in the same batch, per-row adapter ids)."""

    opened = prompt_opens_think(tok)

    def run(records, suite):
        model = model_fn()
        context = min(sft.max_seq_len, model.config.max_position_embeddings)
        opts = dataclasses.replace(sft, max_seq_len=context)
        prompts = [generation_prompt_ids(tok, r, opts, suite.max_new_tokens) for r in records]
        fits = [len(p) + suite.max_new_tokens <= context for p in prompts]
        kept = [p for p, ok in zip(prompts, fits) if ok]
        gen = GenerationOptions(
            max_new_tokens=suite.max_new_tokens,
            temperature=suite.temperature,
            stop_ids=stop_ids(tok),
            prefill_chunk=suite.prefill_chunk,
        )
        arms = max(num_arms, 1)
        rows = [p for p in kept for _ in range(arms)]  # prompt-major: a batch holds the same prompts as alone
        pixels = None
        if opts.tokens_per_image:  # LLaVA: each prompt's images
            kept_records = [r for r, ok in zip(records, fits) if ok]
            pixels = [example_pixels(r, opts) for r in kept_records for _ in range(arms)]
        texts = (
            complete(
                model,
                rows,
                gen,
                tok.decode,
                stop_strings=suite.stop,
                batch_size=suite.batch_size * arms,
                seed=seed,
                mesh=mesh,
                pad_multiple=PAD_MULTIPLE,
                adapter_ids=[k for _ in kept for k in range(arms)] if num_arms else None,
                pixels=pixels,
            )
            if kept
            else []
        )
        per_arm = []
        for k in range(arms):
            replies = iter(texts[k::arms])
            per_arm.append([Completion(len(p), next(replies), opened) if ok else None for p, ok in zip(prompts, fits)])
        return per_arm if num_arms else per_arm[0]

    return run


def latency_fn(model_fn, config, context: int):
    """() -> latency.measure's {"variants": {"base"|"unmerged"|"merged": TTFT/TPOT stats}, "device",
    "device_count", "mesh"} of the model as it is now (eval.latency), decoded on the serving mesh
    eval.latency.mesh picks (sharding.serving_mesh), not on the training mesh.
    The settings are validated with the config (run_config.validate, before anything is written);
    checked again here, against this model's context (and a LLaVA's image placeholders, which
    latency.Requests puts before the prompt), for callers that skip validation; not at all when
    "latency" is not in eval.evaluators (nothing will call the result)."""
    if "latency" in config.eval.evaluators:
        model = model_fn()
        llava = getattr(model, "llava_config", None)
        check_latency(config, context, llava.tokens_per_image if llava else 0)
        check_serving_mesh(config.eval.latency.mesh, model.config.num_kv_heads)

    def run():
        s = config.eval.latency
        return latency.measure(model_fn(), s.batch_size, s.prompt_tokens, s.new_tokens, s.requests, s.warmup, s.mesh)

    return run


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
    fits = spec.targets == own.targets and spec.use_rslora == own.use_rslora and spec.layers == own.layers
    fits = fits and all(
        spec.rank_for(t) == own.rank_for(t) and math.isclose(spec.alpha_for(t), own.alpha_for(t)) for t in spec.targets
    )
    if not fits:
        raise CheckpointError(
            f"{adapter_dir}: adapter on {spec.targets} does not fit the model (targets {own.targets}, "
            f"lora.rank={own.rank}, lora.alpha={own.alpha}); a randomly initialised base can only take an adapter "
            "of the config's own arm"
        )


def evaluate(config, workdir: str) -> dict:
    """Loads what mode=eval scores (see the module docstring) and runs the evaluators once."""
    from lora_jax.train import loss_on_test_split, metric_writer, start_run

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
    data = data_iterators(config, workdir, tokenizer_dir(config, workdir), model.config.vocab_size, batch_sh, images)
    writer = metric_writer(workdir)
    label = labelled_config(config, model)
    ctx = EvalContext(
        label,
        workdir,
        writer,
        data.sources,
        completion_fn(lambda: nnx.merge(trainer.graphdef, lora, frozen), data.tokenizer, data.sft_options, mesh),
        lambda: loss_on_test_split(trainer.eval_step, lora, frozen, data.eval_iterator(), config, batch_sh),
        adapter,
        source,
        latency_fn(lambda: nnx.merge(trainer.graphdef, lora, frozen), config, model.config.max_position_embeddings),
    )
    results = dict(run_evaluators(ctx, step), adapter=adapter, adapter_source=source, step=step)
    results.update(
        dataset=config.data.name,
        arm=label.arm,
        targets=list(label.lora.targets),
        seed=config.train.seed,
        base_model=fingerprint,
    )
    writer.flush()
    if jax.process_index() == 0:
        (workdir / "eval").mkdir(parents=True, exist_ok=True)
        write_text_atomic(workdir / "eval" / "results.json", json.dumps(results, indent=1))
        print(f"results: {workdir / 'eval'}", flush=True)
    return results
