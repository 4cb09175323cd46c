"""The latency suite: its model variants (base, unmerged, merged), its measurement, and where it decodes
(a serving mesh, never the training mesh's FSDP: read from the HLO of the executables it times)."""

import json
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import base
from eval.evaluators import EvalContext, latency_evaluator
from lora_jax import sharding
from lora_jax.errors import ConfigError
from lora_jax.io.files import write_text_atomic
from lora_jax.lora.bank import AdapterBank
from lora_jax.lora.spec import LoraSpec
from lora_jax.model.llava import Llava, LlavaConfig
from lora_jax.model.transformer import RuntimeOptions, Transformer
from lora_jax.model.vision import VisionConfig
from lora_jax.run.config import lora_spec, random_model_config, runtime_options
from lora_jax.run.eval_hooks import latency_fn
from lora_jax.serve import latency
from lora_jax.sharding import global_batch
from lora_jax.train.trainer import build_trainer
from tests.tiny_model import TINY

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, size=(2, 12)))
IS_VAR = lambda x: isinstance(x, nnx.Variable)  # noqa: E731


def _adapted():
    model = Transformer(TINY, LoraSpec(targets=("o_proj", "fc2"), rank=4, alpha=8), RuntimeOptions(), rngs=nnx.Rngs(0))
    for t in model.lora.targets:
        b = getattr(model.layers, t).lora_b
        b.set_value(jnp.asarray(np.random.default_rng(1).normal(size=b.get_value().shape), jnp.float32))
    return model


def _on_mesh(make, mesh):
    """The model `make()` builds, with random values placed on `mesh` by its logical axes (no eager init:
    XLA:CPU compiles every eager op)."""
    model = nnx.eval_shape(make)
    state = nnx.state(model)
    rng = np.random.default_rng(0)
    put = lambda v, s: jax.device_put(0.1 * rng.normal(size=v.get_value().shape).astype(np.float32), s)  # noqa: E731
    nnx.update(model, jax.tree.map(put, state, sharding.state_shardings(state, mesh), is_leaf=IS_VAR))
    return model


def _kernel_sizes(model) -> set[int]:
    """Element counts of the frozen kernels (embedding, LM head, and each stacked kernel whole or one
    layer's slice): an all-gather of one of these sizes is a kernel gathered from its shards."""
    sizes = set()
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))):
        shape, axes = var.get_value().shape, var.get_metadata().get("logical_axes") or ()
        per_layer = shape[1:] if axes[:1] == ("layers",) else shape
        if len(per_layer) >= 2:
            sizes |= {math.prod(shape), math.prod(per_layer)}
    return sizes


def kernel_gathers(hlo: str, model) -> list[str]:
    """The all-gather instructions of an HLO text whose result is the size of a kernel (or its layer slice)."""
    sizes, found = _kernel_sizes(model), []
    for line in hlo.splitlines():
        op = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
        if op and any(
            math.prod(int(d) for d in dims.split(",") if d) in sizes
            for dims in re.findall(r"\[([\d,]*)\]", op.group(1))
        ):
            found.append(line.strip()[:160])
    return found


@nnx.jit
def _logits(model, tokens):  # jitted: eager, every op of the forward would compile on its own
    return model(tokens)


def test_variants_compute_what_they_claim_and_leave_the_model_alone():
    model = _adapted()
    before = np.asarray(_logits(model, TOKENS))
    v = latency.variants(model)
    np.testing.assert_array_equal(np.asarray(_logits(model, TOKENS)), before)  # merging a copy never touches the model
    np.testing.assert_allclose(np.asarray(_logits(v["merged"], TOKENS)), before, atol=1e-5)
    plain = Transformer(TINY, None, RuntimeOptions(), rngs=nnx.Rngs(0))  # the same seed: the same base weights
    np.testing.assert_allclose(np.asarray(_logits(v["base"], TOKENS)), np.asarray(_logits(plain, TOKENS)), atol=1e-6)
    assert not np.allclose(np.asarray(_logits(v["base"], TOKENS)), before, atol=1e-3)


class _Writer:
    def write_scalars(self, step, scalars):
        self.scalars = scalars


@pytest.fixture(scope="module")
def fsdp_run():
    """The runlocal config on TINY's shape with all four adapters, its model on the 1x8x1 (FSDP) mesh."""
    config = base.arm_config("medreason", "all", "runlocal")
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
    ):
        config.model[key] = getattr(TINY, key)
    config.lora.dropout, config.train.global_batch_size, config.data.max_seq_len = 0.0, 8, 16
    mesh = sharding.make_mesh((1, 8, 1))
    cfg, spec, opts = random_model_config(config), lora_spec(config), runtime_options(config)
    return config, mesh, _on_mesh(lambda: Transformer(cfg, spec, opts, rngs=nnx.Rngs(0)), mesh)


@pytest.fixture(scope="module")
def measured(fsdp_run, tmp_path_factory):
    """The evaluator's path (evaluate.latency_fn -> latency.measure -> eval/latency.json) on the FSDP
    model, forced tensor-parallel: TINY's 2 kv heads -> a (1, 1, 2) mesh of 2 of the 8 devices.
    (config, eval/latency.json, the (serving mesh, runners) `measure` timed), the runners recorded
    from its call of `latency.prepare`."""
    _, _, model = fsdp_run
    config = base.get_config()
    s = config.eval.latency
    s.batch_size, s.prompt_tokens, s.new_tokens, s.requests, s.warmup, s.mesh = 1, 8, 4, 3, 1, "tensor"
    prepare, timed = latency.prepare, []
    out = tmp_path_factory.mktemp("latency")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(latency, "prepare", lambda *args, **kw: timed.append(prepare(*args, **kw)) or timed[-1])
        ctx = EvalContext(
            config=config,
            workdir=out,
            writer=_Writer(),
            sources={},
            complete=None,
            eval_loss=None,
            adapter=None,
            adapter_source="training",
            write_text=write_text_atomic,
            latency=latency_fn(lambda: model, config, 64),
        )
        latency_evaluator(ctx, 7)
    assert len(timed) == 1
    return config, json.loads((out / "eval" / "latency.json").read_text()), timed[0]


def test_latency_json_records_percentiles_and_the_serving_mesh(fsdp_run, measured):
    _, _, model = fsdp_run
    config, result, _ = measured
    assert result["device"] == jax.devices()[0].device_kind
    assert result["device_count"] == 2 and result["mesh"] == {"data": 1, "fsdp": 1, "tensor": 2}
    assert set(result["variants"]) == {"base", "unmerged", "merged"}
    for stats in result["variants"].values():
        assert stats["requests"] == 3 and 0 < stats["tpot_ms_p50"] <= stats["tpot_ms_p95"]
        assert 0 < stats["ttft_ms_p50"] <= stats["ttft_ms_p95"]
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval.latency.mesh = "tensor:3"  # 3 does not divide 2 kv heads: refused when the run starts, naming the key
    with pytest.raises(ConfigError, match=r"eval\.latency\.mesh='tensor:3'"):
        latency_fn(lambda: model, config, 64)


def test_the_timed_decode_gathers_no_kernel_on_its_serving_mesh(fsdp_run, measured):
    """On 8 devices, the prefill and decode step that `measure` times for each variant (base,
    unmerged, merged: each Stepper's jitted functions, compiled once by a request — so `compiled()`,
    lowered with the same arguments, is the executable that was timed) hold no all-gather of a kernel
    and run on the serving mesh's devices only, on one device (no collective at all) and forced
    tensor-parallel (2 devices: TINY has 2 kv heads); both decode the same tokens, and the training
    model stays on its FSDP mesh. (Before, `measure` decoded the training model as it was: here an
    8-device step whose layers all-reduce activations over all 8 devices.)"""
    _, train_mesh, model = fsdp_run
    tokens = {}
    for kind, tensor in (("single", 1), ("tensor", 2)):
        if kind == "tensor":  # the runners `measure` timed in `measured` (a warm-up and 3 requests each)
            serve, runners = measured[2]
        else:  # run as `measure` runs them: a warm-up request (compiles the two functions), a timed one
            serve, runners = latency.prepare(model, 1, 8, 4, mesh=kind)
            for runner in runners.values():
                runner.request()
                runner.request()
        assert sharding.mesh_sizes(serve) == {"data": 1, "fsdp": 1, "tensor": tensor}
        assert set(runners) == {"base", "unmerged", "merged"}
        for variant, runner in runners.items():
            kernel = runner.stepper.params["layers"]["qkv"]["kernel"].get_value()
            assert kernel.sharding.mesh == serve and kernel.sharding.spec[2] == ("tensor" if tensor > 1 else None)
            # what the step reads: each layer's own slice and head-major cache, kv heads still over "tensor"
            heads = "tensor" if tensor > 1 else None
            for layer, cache_k in zip(runner.stepper.layers, runner.stepper.cache0["k"]):
                assert (
                    layer["qkv"]["kernel"].sharding.mesh == serve and layer["qkv"]["kernel"].sharding.spec[1] == heads
                )
                assert cache_k.sharding.mesh == serve and cache_k.sharding.spec[1] == heads
            # one executable each: the one every request ran, and the one compiled() gives back
            assert (runner.stepper._prefill._cache_size(), runner.stepper._step._cache_size()) == (1, 1), variant
            if variant == "unmerged":
                tokens[kind] = [int(runner.stepper.prefill(runner.tokens, runner.mask)[0])]
                tokens[kind] += [int(runner.stepper.step()[0]) for _ in range(3)]
            for name, compiled in runner.stepper.compiled().items():
                hlo = compiled.as_text()
                assert kernel_gathers(hlo, model) == [], (kind, variant, name)
                if tensor == 1:  # one device: no collective at all
                    assert not re.search(r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute", hlo)
                # it runs on the serving mesh's devices only (the training mesh's decode spans all 8)
                shardings = jax.tree.leaves(
                    compiled.input_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
                )
                assert set().union(*(sh.device_set for sh in shardings)) == set(serve.devices.flat), (kind, variant)
            assert (runner.stepper._prefill._cache_size(), runner.stepper._step._cache_size()) == (1, 1), variant
    assert tokens["single"] == tokens["tensor"]
    assert model.layers.qkv.kernel.get_value().sharding.mesh == train_mesh  # the training model is untouched


def test_the_training_step_gathers_kernels_under_fsdp(fsdp_run):
    """The same detector on the compiled training step of the same model on the 1x8x1 mesh: FSDP
    gathers each kernel's shards (so `kernel_gathers` can fail the test above)."""
    config, mesh, model = fsdp_run
    t = build_trainer(model, config, mesh)
    host = {k: np.zeros((8, 16), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    batch = global_batch(dict(host, loss_mask=np.ones((8, 16), np.float32)), t.batch_sharding)
    # The optimized HLO (all-gathers included) is the same at every backend optimization level; level 0
    # only skips LLVM's optimization of machine code that nothing here runs (half the compile time).
    lowered = t.train_step.lower(t.lora, t.opt_state, t.frozen, batch, 0)
    hlo = lowered.compile(compiler_options={"xla_backend_optimization_level": 0}).as_text()
    assert len(kernel_gathers(hlo, model)) >= 4


def test_the_serving_mesh_rule(monkeypatch):
    devices = jax.devices()
    mesh = lambda value, kv: sharding.mesh_sizes(sharding.serving_mesh(value, kv, 10**9, devices))["tensor"]  # noqa: E731
    assert [mesh("auto", 2), mesh("single", 8), mesh("tensor", 2), mesh("tensor", 12), mesh("tensor:4", 8)] == [
        1,
        1,
        2,
        6,
        4,
    ]
    monkeypatch.setattr(sharding, "fits_one_device", lambda device, num_bytes: False)
    assert [mesh("auto", 8), mesh("auto", 12), mesh("auto", 1), mesh("single", 8)] == [8, 6, 1, 1]
    for value, kv in (("tensor", 1), ("tensor:3", 8), ("tensor:16", 16), ("tensor:0", 8), ("fsdp", 8), ("single:2", 8)):
        with pytest.raises(ConfigError, match=r"^eval\.latency\.mesh="):
            sharding.serving_mesh(value, kv, 0, devices)
    monkeypatch.undo()

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    free_60 = Device({"bytes_limit": 100, "bytes_in_use": 40})
    assert sharding.fits_one_device(free_60, 60) and not sharding.fits_one_device(free_60, 61)
    assert sharding.fits_one_device(Device(None), 10**15)  # no memory stats (CPU): fits
    # What "auto" weighs: every weight, the merged copies of the adapted kernels, the per-layer slices
    # the Steppers decode from (the decoder layers' arrays once, the merged kernels' once more), two KV
    # caches per variant (each Stepper's empty one and its live one).
    spec = LoraSpec(targets=("o_proj", "fc2"), rank=4, alpha=8)
    model = nnx.eval_shape(lambda: Transformer(TINY, spec, RuntimeOptions(), rngs=nnx.Rngs(0)))
    weights = sum(x.size * 4 for x in jax.tree.leaves(nnx.state(model)))  # all float32
    merged = 4 * TINY.num_layers * (TINY.num_heads * TINY.head_dim + TINY.intermediate_size) * TINY.hidden_size
    cache = 2 * TINY.num_layers * 3 * 20 * TINY.num_kv_heads * TINY.head_dim * 4
    layers = sum(v.get_value().size * 4 for path, v in nnx.to_flat_state(nnx.state(model)) if path[0] == "layers")
    assert latency.serving_bytes(model, 3, 20) == weights + layers + 2 * merged + 6 * cache


def test_the_variants_decode_from_one_frozen_split_and_a_cache_has_two_buffers():
    """What serving_bytes counts: base, unmerged and merged share the slices of the frozen base;
    merged has its own only for its merged kernels. A Stepper refuses another model's split."""
    from lora_jax.serve.generate import GenerationOptions, Stepper, init_cache
    from lora_jax.serve.layer_arrays import split_layers

    v = latency.variants(_adapted())
    base, unmerged, merged = split_layers(v["base"], v["unmerged"], v["merged"])
    for i in range(TINY.num_layers):
        assert base[i]["qkv"]["kernel"] is unmerged[i]["qkv"]["kernel"] is merged[i]["qkv"]["kernel"]
        assert base[i]["attn_norm"] is merged[i]["attn_norm"]
        assert merged[i]["o_proj"]["kernel"] is not unmerged[i]["o_proj"]["kernel"]
        assert unmerged[i]["o_proj"]["lora_a"].shape[-1] == 4 and "lora_a" not in base[i]["o_proj"]
    with pytest.raises(ValueError, match="not this model's per-layer arrays"):
        Stepper(v["unmerged"], GenerationOptions(max_new_tokens=2), 1, 4, layers=base)
    for per_layer in (False, True):  # k and v are separate buffers (a step donates both)
        cache = init_cache(v["base"], 1, 8, per_layer=per_layer)
        assert all(k is not w for k, w in zip(jax.tree.leaves(cache["k"]), jax.tree.leaves(cache["v"])))


def test_a_llava_and_a_bank_reshard_onto_the_serving_mesh():
    """`resharded` copies any model onto the serving mesh by logical axes (the decoder's heads and MLP
    over "tensor", the vision tower replicated), values unchanged, the original left where it was."""
    fsdp = sharding.make_mesh((1, 8, 1))
    serve = sharding.serving_mesh("tensor", TINY.num_kv_heads, 0)
    vision = VisionConfig(
        "siglip", hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=16, patch_size=8
    )
    llava_cfg = LlavaConfig(vision, TINY, image_token_id=60, feature_layer=-1)
    bank = AdapterBank(("a", "b"), (LoraSpec(("o_proj",), rank=2), LoraSpec(("qkv", "fc2"), rank=4)))
    models = {
        "llava": _on_mesh(
            lambda: Llava(llava_cfg, LoraSpec(("fc1",), rank=2), RuntimeOptions(), rngs=nnx.Rngs(0)), fsdp
        ),
        "bank": _on_mesh(lambda: Transformer(TINY, bank, RuntimeOptions(), rngs=nnx.Rngs(0)), fsdp),
    }
    for name, model in models.items():
        served = sharding.resharded(model, serve)
        before, after = nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(served))
        for (path, old), (_, new) in zip(before, after):
            assert old.get_value().sharding.mesh == fsdp, (name, path)
            assert new.get_value().sharding == sharding.variable_sharding(new, serve), (name, path)
            np.testing.assert_array_equal(np.asarray(new.get_value()), np.asarray(old.get_value()))
        language = getattr(served, "language", served)
        for target, dim in (("qkv", 2), ("o_proj", 1), ("fc1", 3), ("fc2", 1)):
            assert getattr(language.layers, target).kernel.get_value().sharding.spec[dim] == "tensor", (name, target)
        if name == "llava":
            tower = nnx.to_flat_state(nnx.state(served.vision))
            assert tower and all(v.get_value().sharding.is_fully_replicated for _, v in tower)


def test_latency_settings_are_checked_only_when_latency_runs():
    """eval.latency settings that cannot run (no tensor parallelism on 1 device, warmup 0) pass when
    "latency" is not in eval.evaluators, in validate and in evaluate.latency_fn, and are refused when it is."""
    from lora_jax.run.config import validate

    config = base.arm_config("cocohd", "oproj", "runlocal")
    config.eval.evaluators = ("loss", "generate")
    config.eval.latency.mesh, config.eval.latency.warmup = "tensor:3", 0
    model = nnx.eval_shape(lambda: Transformer(TINY, None, RuntimeOptions(), rngs=nnx.Rngs(0)))
    validate(config)
    latency_fn(lambda: model, config, 64)
    config.eval.evaluators = ("loss", "latency")
    for check in (lambda: validate(config), lambda: latency_fn(lambda: model, config, 64)):
        with pytest.raises(ConfigError, match=r"^eval\.latency\.warmup=0"):
            check()


@pytest.mark.parametrize("value", ["tensor:3", "fsdp"])
def test_validate_refuses_a_serving_mesh_it_cannot_build(value):
    """Before anything is written: the runlocal model has 2 kv heads, so 3-way tensor parallelism (or an
    unknown mesh name) is refused naming eval.latency.mesh."""
    from lora_jax.run.config import validate

    config = base.arm_config("medreason", "oproj", "runlocal")
    validate(config)  # "auto" (the default) is valid
    config.eval.latency.mesh = value
    with pytest.raises(ConfigError, match=rf"^eval\.latency\.mesh='{value}'"):
        validate(config)
