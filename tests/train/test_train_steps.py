"""The jitted step: accumulation, packing, meshes, checkpoint resharding, NaN guard, config validation."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from configs import base
from lora_jax.io.checkpoints import CheckpointStore
from lora_jax.model.transformer import Transformer
from lora_jax.run.config import (
    arm_configs,
    check_hf_conflicts,
    lora_spec,
    random_model_config,
    runtime_options,
    validate,
)
from lora_jax.run.train_loop import train_and_evaluate
from lora_jax.sharding import global_batch, make_mesh, shard_model
from lora_jax.train.trainer import build_trainer
from tests.tiny_model import sample_batches, set_keys

ODD_VOCAB = 263


def make_config(**changes):
    config = base.arm_config("medreason", "oproj_fc2", "runlocal")
    config.model.vocab_size = ODD_VOCAB
    config.lora.dropout = 0.0
    return set_keys(config, changes)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    return sample_batches(tmp_path_factory.mktemp("steps"), 3, max_seq_len=512)


def run_steps(config, mesh, batches, n_steps, trainer=None):
    model = Transformer(
        random_model_config(config),
        lora_spec(config),
        runtime_options(config),
        rngs=nnx.Rngs(config.train.seed),
    )
    shard_model(model, mesh)
    t = trainer or build_trainer(model, config, mesh)
    lora, opt, losses = t.lora, t.opt_state, []
    for step in range(n_steps):
        lora, opt, metrics = t.train_step(lora, opt, t.frozen, global_batch(batches[step], t.batch_sharding), step)
        losses.append(float(metrics["loss"]))
    return losses, lora, opt, t


def one_device():
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def max_diff(a, b):
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_accumulation_4_equals_1(batches, dropout):
    """Also with LoRA dropout: a row's masks depend on the row, not on the micro-batch it lands in."""
    small = [{k: v[:4] for k, v in b.items()} for b in batches]
    one = make_config(**{"optim.grad_accum_steps": 1, "lora.dropout": dropout})
    four = make_config(**{"optim.grad_accum_steps": 4, "lora.dropout": dropout})
    ref_losses, ref_lora, _, _ = run_steps(one, one_device(), small, 2)
    losses, lora, _, trainer = run_steps(four, one_device(), small, 2)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-6)
    assert max_diff(lora, ref_lora) <= 1e-6
    assert trainer.train_step._cache_size() == 1  # no recompilation after the first step


def test_packed_equals_unpacked(batches):
    """The same examples packed 3-4 per row or one per row: the token-weighted loss and update agree."""
    packed = {k: v[:2] for k, v in batches[0].items()}
    rows = []
    for r in range(2):
        seg = packed["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            idx = np.nonzero(seg == s)[0]
            row = {k: np.zeros_like(v[r]) for k, v in packed.items()}
            for k in row:
                row[k][: len(idx)] = packed[k][r][idx]
            rows.append(row)
    assert len(rows) > 2 and len({int(r["loss_mask"].sum()) for r in rows}) > 1  # unequal target counts
    rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (8 - len(rows))  # empty rows: no targets
    unpacked = {k: np.stack([r[k] for r in rows]) for k in packed}
    ref_losses, ref_lora, _, _ = run_steps(make_config(**{"train.global_batch_size": 2}), one_device(), [packed], 1)
    losses, lora, _, _ = run_steps(make_config(**{"train.global_batch_size": 8}), one_device(), [unpacked], 1)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-6)
    assert max_diff(lora, ref_lora) <= 1e-6


def test_meshes_agree_with_one_device_and_checkpoints_reshard(batches, tmp_path):
    config = make_config(**{"train.global_batch_size": 8, "model.attention_impl": "chunked"})
    ref, _, _, _ = run_steps(config, one_device(), batches, 3)
    for shape in [(2, 2, 2), (1, 8, 1)]:
        losses, _, _, _ = run_steps(config, make_mesh(shape), batches, 3)
        np.testing.assert_allclose(losses, ref, atol=1e-5, err_msg=str(shape))
    # save after 2 steps on 2x2x2, resume on 1x8x1 for the third step
    _, lora, opt, _ = run_steps(config, make_mesh((2, 2, 2)), batches, 2)
    store = CheckpointStore(str(tmp_path), 2, {"arm": "x"})
    store.save(2, lora, opt, {"cursor": 0}, {})
    store.wait()
    _, _, _, t = run_steps(config, make_mesh((1, 8, 1)), batches, 0)
    lora8, opt8, data_state, meta = store.restore(2, t.lora, t.opt_state)
    assert meta["arm"] == "x" and data_state == {"cursor": 0}
    assert jax.tree.leaves(lora8)[0].sharding.mesh.devices.shape == (1, 8, 1)
    _, _, m = t.train_step(lora8, opt8, t.frozen, global_batch(batches[2], t.batch_sharding), 2)
    np.testing.assert_allclose(float(m["loss"]), ref[2], atol=1e-5)


def test_non_finite_loss_stops_the_run_and_saves_nothing(tmp_path):
    config = base.arm_config("medmcqa", "oproj", "runlocal")
    config.optim.learning_rate, config.optim.warmup_steps = 1e38, 0  # the first update overflows (NaN lr is refused)
    with pytest.raises(FloatingPointError, match=r"training diverged at step \d+: (non-finite|adapter norm)"):
        train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"lora.targets": ("o_proj", "attn")}, "valid targets: qkv, o_proj, fc1, fc2"),
        ({"mesh.shape": (3, 1, 1)}, "needs 3 devices, but 8 are available"),
        ({"mesh.shape": (1, -1, 1), "train.global_batch_size": 4}, "divide the data x fsdp mesh axes"),
        ({"model.param_dtype": "float16"}, "model.param_dtype='float16' is unknown"),
        ({"model.attention_impl": "splash"}, "model.attention_impl='splash' is unknown"),
    ],
)
def test_bad_config_is_refused_before_compiling(changes, message):
    config = make_config()
    for key, value in changes.items():
        section, name = key.split(".")
        config[section][name] = value
    with pytest.raises(ValueError, match=message):
        validate(config)


def test_hf_conflicts_and_unknown_keys():
    from lora_jax.model.config import ModelConfig

    config = make_config()
    hf = dataclasses.replace(random_model_config(config), hidden_size=128)
    assert isinstance(hf, ModelConfig)
    with pytest.raises(ValueError, match="model.hidden_size=64 conflicts with /ckpt/config.json \\(128\\)"):
        check_hf_conflicts(config, hf, "/ckpt")
    import main

    with config.unlocked():
        config.train.learning_rate = 0.1
    with pytest.raises(ValueError, match="unknown config key\\(s\\): train.learning_rate"):
        main.check_schema(config)


def test_every_arm_file_loads_and_validates():
    import importlib.util
    import pathlib

    from lora_jax.lora.arms import ARMS

    files = sorted(pathlib.Path(base.__file__).parent.glob("[a-z]*_*.py"))
    joint = [p for p in files if p.stem.endswith("_all_arms")]  # every arm in one job (tests/run/test_train_arms.py)
    files = [p for p in files if p not in joint]
    assert len(files) == 55 and len(joint) == 6  # 40 text arms + LLaVA-CoT 9 + Invoice OCR 6; planted: joint only
    for path in files:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        dataset, arm = path.stem.split("_", 1)
        for arg in (None, "runlocal"):
            config = module.get_config(arg)
            assert config.data.name == dataset and config.arm == arm
            assert tuple(config.lora.targets) == ARMS[arm]
            lora_spec(config)
            runtime_options(config)
        assert module.get_config(None).data.max_seq_len >= (32768 if dataset in ("govreport", "cocohd") else 1024)
    from configs.sweeps.study import STUDY_ARMS

    for path in joint:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        dataset = path.stem.split("_", 1)[0]
        for arg in (None, "runlocal"):
            config = module.get_config(arg)
            arms = tuple(ARMS) if dataset == "planted" else STUDY_ARMS[dataset]  # a planted study: all nine
            assert config.data.name == dataset and tuple(config.arms) == arms
            if arg == "runlocal":  # validated as each arm's own run (the full configs need model.hf_dir)
                assert len(arm_configs(config)) == len(arms)


def test_the_trainer_updates_only_lora_and_keeps_moments_only_for_lora(batches):
    """What trains (build_trainer's jitted step), not nnx.Optimizer: Adam moments exist exactly for the
    LoRA leaves; at step 0 only B moves (B = 0 makes dA = 0), A moves from step 1; frozen stays bitwise."""
    import optax

    config = make_config(**{"train.global_batch_size": 8, "optim.warmup_steps": 0})  # lr > 0 from step 0
    _, _, _, t = run_steps(config, one_device(), batches, 0)
    frozen_before = [np.array(x) for x in jax.tree.leaves(t.frozen)]
    lora0 = {"/".join(map(str, p)): np.array(v) for p, v in nnx.to_flat_state(t.lora)}
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
    adam = next(s for s in jax.tree.leaves(t.opt_state, is_leaf=is_adam) if is_adam(s))
    assert jax.tree.structure(adam.mu) == jax.tree.structure(t.lora)
    assert jax.tree.structure(adam.nu) == jax.tree.structure(t.lora)
    lora, opt = t.lora, t.opt_state
    after = []
    for step in range(2):
        lora, opt, _ = t.train_step(lora, opt, t.frozen, global_batch(batches[step], t.batch_sharding), step)
        after.append({"/".join(map(str, p)): np.array(v) for p, v in nnx.to_flat_state(lora)})
    for name, value in lora0.items():
        moved = [float(np.abs(a[name] - value).max()) > 0 for a in after]
        assert moved == ([False, True] if name.endswith("lora_a") else [True, True]), name
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(frozen_before, jax.tree.leaves(t.frozen)))


def test_a_real_arms_defaults_train(batches):
    """bfloat16 base and compute, remat="dots", chunked attention (base.py's defaults for real arms) run
    the real step: the loss is float32's within bfloat16 tolerance, and remat changes no float32 number
    (in bfloat16 the recomputed activations may round differently: adapters agree to 1e-3)."""
    b8 = {"train.global_batch_size": 8}
    real = {**b8, "model.param_dtype": "bfloat16", "model.compute_dtype": "bfloat16", "model.attention_impl": "chunked"}
    f32_none, f32_lora_none, _, _ = run_steps(make_config(**b8), one_device(), batches, 3)
    f32_dots, f32_lora_dots, _, _ = run_steps(make_config(**{**b8, "model.remat": "dots"}), one_device(), batches, 3)
    bf16_dots, lora_dots, _, _ = run_steps(make_config(**{**real, "model.remat": "dots"}), one_device(), batches, 3)
    bf16_none, lora_none, _, _ = run_steps(make_config(**{**real, "model.remat": "none"}), one_device(), batches, 3)
    np.testing.assert_allclose(bf16_dots, f32_none, rtol=2e-2)
    # A few float32 ulps (losses ~5.5): recomputation may fuse differently, a wrong remat moves far more.
    np.testing.assert_allclose(f32_dots, f32_none, rtol=1e-6)
    assert max_diff(f32_lora_dots, f32_lora_none) <= 1e-6
    np.testing.assert_allclose(bf16_dots, bf16_none, rtol=1e-6)
    assert max_diff(lora_dots, lora_none) <= 1e-3
