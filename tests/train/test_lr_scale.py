"""Per-target learning rates and LoRA+ (optim.lr_per_target, optim.loraplus_ratio): two steps equal a
hand-computed AdamW; LoRA+ equals PEFT's create_loraplus_optimizer (torch AdamW) on the parameters;
arm variants (arm@lp=16) set them; the resume identity holds both keys. (Joint training with
different settings per arm equals separate runs: tests/lora/test_adapter_bank.py.)"""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from lora_jax.errors import ConfigError
from lora_jax.io.checkpoints import WorkdirMismatchError
from lora_jax.lora.arms import parse_arm
from lora_jax.run.assemble import open_checkpoint_store, run_identity
from lora_jax.run.config import arm_config, lr_scale, validate
from lora_jax.train.step import LrScale, make_optimizer

LR, WD, WARMUP, TOTAL, EPS = 0.01, 0.1, 0, 10, 1e-8


def _params(rng):
    """A LoRA-shaped tree: two targets, A and B each (the paths the optimizer reads targets from)."""
    shapes = {"o_proj": ((2, 6, 3), (2, 3, 5)), "fc2": ((2, 4, 3), (2, 3, 4))}
    return {"layers": {t: {"lora_a": rng.normal(size=a), "lora_b": rng.normal(size=b)} for t, (a, b) in shapes.items()}}


def _schedule(step):
    """optax.warmup_cosine_decay_schedule with no warmup, written out: peak x (1 + cos(pi t / T)) / 2."""
    return LR * 0.5 * (1 + math.cos(math.pi * step / TOTAL))


def _adamw_by_hand(params, grads, factor):
    """Two AdamW steps (decoupled weight decay), each leaf's learning rate = schedule(t) x factor(leaf)."""
    out = {}
    for t, leaves in params["layers"].items():
        for kind, p in leaves.items():
            p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
            for step, g in enumerate(grads):
                g = g["layers"][t][kind]
                m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
                m_hat, v_hat = m / (1 - 0.9 ** (step + 1)), v / (1 - 0.999 ** (step + 1))
                p = p - _schedule(step) * factor(t, kind) * (m_hat / (np.sqrt(v_hat) + EPS) + WD * p)
            out[(t, kind)] = p
    return out


def _two_steps(scale, params, grads):
    tx, _ = make_optimizer(LR, WARMUP, TOTAL, WD, 0.0, None, [scale])
    p = {"layers": {t: {k: jnp.asarray(v, jnp.float32) for k, v in d.items()} for t, d in params["layers"].items()}}
    state = tx.init(p)
    for g in grads:
        g = {"layers": {t: {k: jnp.asarray(v, jnp.float32) for k, v in d.items()} for t, d in g["layers"].items()}}
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
    return {(t, k): np.asarray(v) for t, d in p["layers"].items() for k, v in d.items()}


def test_two_steps_with_multipliers_equal_adamw_by_hand():
    rng = np.random.default_rng(0)
    params, grads = _params(rng), [_params(rng), _params(rng)]
    scale = LrScale((("o_proj", 3.0), ("fc2", 0.5)), loraplus_ratio=4.0)
    ours = _two_steps(scale, params, grads)
    want = _adamw_by_hand(
        params, grads, lambda t, kind: {"o_proj": 3.0, "fc2": 0.5}[t] * (4.0 if kind == "lora_b" else 1)
    )
    for key in want:
        np.testing.assert_allclose(ours[key], want[key], rtol=2e-5, atol=1e-6, err_msg=str(key))
    plain = _two_steps(LrScale(), params, grads)  # the multipliers do act: 1 everywhere is another result
    assert not np.allclose(plain[("o_proj", "lora_b")], ours[("o_proj", "lora_b")])


def test_loraplus_equals_peft_create_loraplus_optimizer_on_the_parameters():
    """PEFT groups lora_B parameters at lr x loraplus_lr_ratio (torch AdamW); its learning rate is set
    to the schedule's value at each step. After two steps the parameters agree."""
    import torch  # the test extras (README): CI fails, not skips, without the reference
    from peft.optimizers import create_loraplus_optimizer

    rng = np.random.default_rng(1)
    params, grads = _params(rng), [_params(rng), _params(rng)]
    ratio = 16.0

    class Layer(torch.nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))})
            self.lora_B = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))})

    model = torch.nn.Module()
    for t, d in params["layers"].items():
        model.add_module(t, Layer(d["lora_a"], d["lora_b"]))
    opt = create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=ratio, loraplus_weight_decay=WD, eps=EPS
    )
    peak = [g["lr"] for g in opt.param_groups]
    for step, g in enumerate(grads):
        for t, layer in model.named_children():
            layer.lora_A["default"].grad = torch.tensor(g["layers"][t]["lora_a"], dtype=torch.float64)
            layer.lora_B["default"].grad = torch.tensor(g["layers"][t]["lora_b"], dtype=torch.float64)
        for group, lr in zip(opt.param_groups, peak):
            group["lr"] = lr * _schedule(step) / LR
        opt.step()
    ours = _two_steps(LrScale(loraplus_ratio=ratio), params, grads)
    # ours in float32, torch in float64: B moves by up to lr x ratio = 0.16 a step, 1e-5 is 6e-5 of it (a
    # ratio or weight decay applied wrongly moves B by 1e-3 or more)
    for t, layer in model.named_children():
        np.testing.assert_allclose(ours[(t, "lora_a")], layer.lora_A["default"].detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(ours[(t, "lora_b")], layer.lora_B["default"].detach().numpy(), atol=1e-5)


def test_an_arm_variant_sets_its_settings_and_a_label_must_match_them():
    assert parse_arm("oproj") == ("oproj", {})
    assert parse_arm("oproj_fc2@lp=16@lr_fc2=0.5") == (
        "oproj_fc2",
        {"optim.loraplus_ratio": 16.0, "optim.lr_per_target.fc2": 0.5},
    )
    for bad, message in [
        ("oproj@lp=0", "must be a number > 0"),
        ("oproj@lp=x", "must be a number > 0"),
        ("oproj@lp=inf", "must be a number > 0"),
        ("oproj@beta=2", "unknown setting 'beta'"),
        ("oproj@lp=2@lp=4", "lp is set twice"),
        ("up@lp=2", "'up' is not a study arm"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_arm(bad)
    joint = base.arm_config("cocohd", "oproj", "runlocal")
    joint.arms = ("oproj", "oproj@lp=16", "fc2@lr_fc2=2")
    validate(joint)
    variant = arm_config(joint, "oproj@lp=16")
    assert (variant.arm, tuple(variant.lora.targets), variant.optim.loraplus_ratio) == ("oproj@lp=16", ("o_proj",), 16)
    assert lr_scale(arm_config(joint, "fc2@lr_fc2=2")).factor("fc2", "lora_a") == 2.0
    variant.optim.loraplus_ratio = 4.0
    with pytest.raises(ConfigError, match=r"config.arm='oproj@lp=16' names optim.loraplus_ratio=16"):
        validate(variant)
    joint.optim.lr_per_target.fc1 = 0.0
    with pytest.raises(ConfigError, match=r"optim.lr_per_target.fc1=0.0 must be >= 1e-12"):
        validate(joint)


def test_the_resume_identity_holds_both_keys(tmp_path):
    config = base.arm_config("cocohd", "oproj", "runlocal")
    identity = run_identity(config, "random-0", "bundled:cocohd")
    assert identity["optim.loraplus_ratio"] == 1.0
    assert identity["optim.lr_per_target"] == {"qkv": 1.0, "o_proj": 1.0, "fc1": 1.0, "fc2": 1.0}
    store = open_checkpoint_store(config, tmp_path, "random-0")
    store.save(1, {"a": jnp.zeros(2)}, {"m": jnp.zeros(2)}, {}, {})
    store.wait()
    for key, change in [("optim.loraplus_ratio", 16.0), ("optim.lr_per_target", {"o_proj": 2.0})]:
        changed = base.arm_config("cocohd", "oproj", "runlocal")
        section, name = key.split(".")
        if isinstance(change, dict):
            changed[section][name].update(change)
        else:
            changed[section][name] = change
        with pytest.raises(WorkdirMismatchError, match=key):
            open_checkpoint_store(changed, tmp_path, "random-0")
        changed.train.allow_changed_on_resume = (key,)  # a change on purpose resumes
        resumed = open_checkpoint_store(changed, tmp_path, "random-0")
        assert resumed.restore(1, {"a": jnp.ones(2)}, {"m": jnp.ones(2)})[0]["a"].tolist() == [0.0, 0.0]


def test_a_checkpoint_from_before_the_keys_resumes_only_with_their_defaults(tmp_path):
    """A workdir saved before the keys existed trained with ratio 1 and multipliers 1: it resumes with
    those, and a run asking for LoRA+ is refused (not switched mid-run)."""
    from lora_jax.io.checkpoints import CheckpointStore

    config = base.arm_config("cocohd", "oproj", "runlocal")
    old = {k: v for k, v in run_identity(config, "random-0", "bundled:cocohd").items() if not k.startswith("optim.l")}
    store = CheckpointStore(str(tmp_path), 3, old)
    store.save(1, {"a": jnp.zeros(2)}, {"m": jnp.zeros(2)}, {}, {})
    store.wait()
    assert open_checkpoint_store(config, tmp_path, "random-0").latest_step() == 1
    config.optim.loraplus_ratio = 16.0
    with pytest.raises(WorkdirMismatchError, match="optim.loraplus_ratio=1.0, this run has 16.0"):
        open_checkpoint_store(config, tmp_path, "random-0")


def test_the_optimizer_state_has_one_layout_whatever_the_settings():
    """Arms of different settings stack in one bank and split into states their own runs resume."""
    import jax

    params = {"layers": {"o_proj": {"lora_a": jnp.zeros((2, 3)), "lora_b": jnp.zeros((3, 2))}}}
    plain = make_optimizer(LR, WARMUP, TOTAL, WD, 1.0, None, [LrScale()])[0].init(params)
    plus = make_optimizer(LR, WARMUP, TOTAL, WD, 1.0, None, [LrScale(loraplus_ratio=8.0)])[0].init(params)
    assert jax.tree.structure(plain) == jax.tree.structure(plus)
