"""Qwen3 and Gemma 3 against transformers and PEFT, beyond the logits parity of test_model_parity.py:
each family feature really matters, a sliding layer never looks (or computes) past its window, and
adapters go both ways with PEFT, greedy decoding included."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lora_jax.io.hf_checkpoint import HFCheckpoint, export_merged, load_hf_model
from lora_jax.io.peft_adapter import export_peft, load_hf_model_with_adapter
from lora_jax.lora.spec import LoraSpec
from lora_jax.model import attention as attention_lib
from lora_jax.model.config import ModelConfig, RopeConfig
from lora_jax.model.transformer import RuntimeOptions, Transformer
from lora_jax.serve.generate import GenerationOptions, Stepper, generate
from lora_jax.sharding import make_mesh
from tests.hf_reference import hf_logits, saved_hf_dir, with_random_b

TOKENS = np.random.default_rng(0).integers(0, 94, size=(2, 32))  # 94..96: the gemma3_mm image tokens


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((1, 2, 4))


@jax.jit
def _fwd(model, tokens):
    return model(tokens)


def _logits(model, tokens=TOKENS):
    return np.asarray(_fwd(model, jnp.asarray(tokens)))


def _load_as(d, mesh, **changes):
    """The checkpoint's weights in a model whose config has `changes` (a feature switched off)."""
    ckpt = HFCheckpoint(d)
    ckpt.config = dataclasses.replace(ckpt.config, **changes)
    return load_hf_model(d, None, RuntimeOptions(), mesh, ckpt=ckpt)


@pytest.mark.parametrize(
    "variant, change",
    [
        ("qwen3", {"qk_norm": False}),
        ("gemma3", {"qk_norm": False}),
        ("gemma3", {"sliding_windows": (100, None)}),  # the mask alone: still a local layer (its RoPE)
        ("gemma3", {"rope": RopeConfig(theta=1e6)}),  # the global RoPE's linear scaling alone
        ("gemma3", {"rope_local": None}),
        ("gemma3", {"final_logit_softcap": None}),
        ("gemma3", {"query_pre_attn_scalar": None}),
        ("gemma3", {"hidden_act": "silu"}),
        ("gemma3", {"embed_scale": False}),
    ],
)
def test_each_family_feature_changes_the_logits(variant, change, mesh):
    """Without the feature our logits leave transformers', so the parity test exercises every one."""
    d = saved_hf_dir(variant)
    assert np.abs(_logits(_load_as(d, mesh, **change)) - hf_logits(d, TOKENS)).max() > 1e-3


def test_a_gemma3_checkpoint_is_read_as_its_language_model():
    cfg = HFCheckpoint(saved_hf_dir("gemma3_mm")).config
    assert cfg.model_type == "gemma3_text" and cfg.hf_prefix == "model.language_model."
    assert cfg.sliding_windows == (8, None) and cfg.rope.rope_type == "linear" and cfg.rope_local.theta == 1e4
    # transformers' Gemma3ForConditionalGeneration does not soft-cap its logits (Gemma3ForCausalLM does)
    assert cfg.final_logit_softcap is None and HFCheckpoint(saved_hf_dir("gemma3")).config.final_logit_softcap == 1.5


# -- the sliding window ---------------------------------------------------------------------------


def _qkv(t, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(1, t, 2, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, t, 2, 8)), jnp.float32) for _ in range(2))
    pos = jnp.arange(t)[None]
    return q, k, v, pos, jnp.ones((1, t), jnp.int32)


@pytest.mark.parametrize("impl", ["xla", "chunked", "causal_blocks"])
def test_a_sliding_layer_never_attends_past_its_window(impl):
    """Keys older than the window are replaced by noise: no query's output moves."""
    t, w = 64, 8
    q, k, v, pos, seg = _qkv(t)
    fn = attention_lib.get_attention_impl(impl)
    kw = dict(window=w, scale=0.3, **({"block": 16} if impl == "causal_blocks" else {}))
    kw.update({"q_block": 16, "kv_block": 16} if impl == "chunked" else {})
    out = fn(q, k, v, pos, pos, seg, seg, **kw)
    for i in (20, 40, 63):  # queries in several blocks; keys < i - w + 1 are outside i's window
        k2 = k.at[:, : i - w + 1].set(99.0)
        v2 = v.at[:, : i - w + 1].set(-99.0)
        out2 = fn(q, k2, v2, pos, pos, seg, seg, **kw)
        np.testing.assert_allclose(out2[:, i], out[:, i], atol=1e-5)
    ref = attention_lib.reference_attention(q, k, v, pos, pos, seg, seg, window=w, scale=0.3)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_the_causal_block_schedule_leaves_out_the_blocks_before_the_window():
    assert attention_lib.causal_block_schedule(64, 16, None) == [(0, 0, 16), (16, 0, 32), (32, 0, 48), (48, 0, 64)]
    # window 8: query block 2 (32..47) sees keys from 25 on, in blocks 1..2; block 3 from 41 on
    assert attention_lib.causal_block_schedule(64, 16, 8) == [(0, 0, 16), (16, 0, 32), (32, 16, 48), (48, 32, 64)]
    # window 18: query 32 sees key 15 (block 0), query 48 key 31 (block 1)
    assert attention_lib.causal_block_schedule(64, 16, 18) == [(0, 0, 16), (16, 0, 32), (32, 0, 48), (48, 16, 64)]


def _compiled_flops(cfg: ModelConfig, t: int) -> float:
    """XLA's cost analysis of a compiled training step's forward and backward (the gradient of a loss
    on the logits with respect to every LoRA parameter)."""
    spec = LoraSpec(targets=("qkv", "o_proj"), rank=2, alpha=4)
    model = Transformer(cfg, spec, RuntimeOptions(attention_impl="causal_blocks"), rngs=nnx.Rngs(0))

    def step(m, x):
        return nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(m)

    cost = nnx.jit(step).lower(model, jnp.zeros((1, t), jnp.int32)).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_a_sliding_branch_compiles_without_the_blocks_outside_its_window():
    """What a sliding layer of a mixed (Gemma 3) model runs: its window-kind branch, the attention with a
    static window. Rows of 512, blocks of 64, window 16: each query block computes 1 or 2 key blocks,
    not all those up to the diagonal."""

    def flops(window):
        q, k, v, pos, seg = _qkv(512)
        fn = jax.jit(lambda q, k, v: attention_lib.causal_block_attention(q, k, v, pos, pos, seg, seg, window=window))
        cost = fn.lower(q, k, v).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    # 8 query blocks: 1 + 2 + ... + 8 = 36 (query, key) block pairs up to the diagonal; 1 + 7 x 2 = 15 in the window
    assert flops(16) / flops(None) == pytest.approx(15 / 36, rel=0.05)


@pytest.mark.parametrize("impl", ["causal_blocks", "chunked"])
def test_gemma3_logits_through_the_block_schedules_match_transformers(impl, mesh, monkeypatch):
    """128 tokens in blocks of 16: the sliding layer's skipped blocks and the global layer's full
    schedule, through each kernel, against transformers."""
    import functools

    name = f"{impl}_16"
    kw = {"block": 16} if impl == "causal_blocks" else {"q_block": 16, "kv_block": 16}
    # registered for this test only (the registry is global: other tests list its names)
    monkeypatch.setitem(attention_lib._IMPLS, name, functools.partial(attention_lib.get_attention_impl(impl), **kw))
    d = saved_hf_dir("gemma3")
    tokens = np.random.default_rng(1).integers(0, 94, size=(1, 128))
    model = load_hf_model(d, None, RuntimeOptions(attention_impl=name), mesh)
    np.testing.assert_allclose(_logits(model, tokens), hf_logits(d, tokens), atol=1e-4)


def test_the_compiled_step_of_sliding_layers_skips_the_blocks_outside_the_window():
    """With every layer sliding (window 16, rows of 512, blocks of 64) the key blocks before each
    window are in neither the forward nor the backward of the compiled step. (With sliding and global
    layers mixed, the scan picks a branch per layer (lax.switch), and the cost analysis cannot tell
    which branch runs; the branches are the same kernels with a static window.)"""
    cfg = ModelConfig(97, 32, 48, 2, 4, 2, 16, max_position_embeddings=512, qk_norm=True, gemma_norms=True)
    full = _compiled_flops(cfg, 512)
    sliding = _compiled_flops(dataclasses.replace(cfg, sliding_windows=(16, 16)), 512)
    assert sliding < 0.7 * full, (sliding, full)


# -- PEFT, both ways, and greedy decoding -----------------------------------------------------------


@pytest.mark.parametrize(
    "variant, targets",
    [("qwen3", ("o_proj", "fc2")), ("gemma3", ("o_proj", "fc2")), ("gemma3_mm", ("qkv", "o_proj", "fc2"))],
)
def test_our_adapter_loads_in_peft_and_greedy_decoding_is_token_for_token(variant, targets, mesh, tmp_path):
    """The prompt (14 tokens) and its 10 new tokens run past gemma's window of 8. On gemma3_mm the
    vision tower has q/k/v_proj of its own: target_modules must leave it alone. Both decoding paths:
    `generate` (stacked weights and cache under the layer scan) and the timed `Stepper`."""
    import peft
    import torch

    from tests.hf_reference import _auto_class

    d = saved_hf_dir(variant)
    model = with_random_b(
        load_hf_model(d, LoraSpec(targets=targets, rank=4, alpha=8), RuntimeOptions(), mesh), scale=0.3
    )
    export_peft(model, str(tmp_path), d)
    np.testing.assert_allclose(_logits(model), hf_logits(d, TOKENS, adapter_dir=str(tmp_path)), atol=1e-4)
    assert np.abs(_logits(model) - hf_logits(d, TOKENS)).max() > 1e-2  # the adapter matters

    hf = _auto_class(d).from_pretrained(d, attn_implementation="eager").float().eval()
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    assert not any("vision" in n for n, _ in hf.named_parameters() if "lora_" in n)
    prompt, n = TOKENS[:, :14], 10
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.as_tensor(prompt, dtype=torch.long),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )[:, prompt.shape[1] :].numpy()
    out, _ = generate(model, prompt, np.ones_like(prompt), GenerationOptions(max_new_tokens=n))
    np.testing.assert_array_equal(out, ref)
    # The timed decoding (Stepper): per-layer weights and head-major per-layer caches, layers unrolled.
    stepper = Stepper(model, GenerationOptions(max_new_tokens=n), prompt.shape[0], prompt.shape[1])
    steps = [stepper.prefill(prompt, np.ones_like(prompt))] + [stepper.step() for _ in range(n - 1)]
    np.testing.assert_array_equal(np.stack(steps, axis=1), ref)


@pytest.mark.parametrize("variant", ["qwen3", "gemma3", "gemma3_mm"])
def test_a_peft_trained_adapter_imports_with_equal_logits(variant, mesh, tmp_path):
    import peft
    import torch

    from tests.hf_reference import _auto_class

    d = saved_hf_dir(variant)
    hf = _auto_class(d).from_pretrained(d).float()
    # o_proj/down_proj are language-model names only (SigLIP's are out_proj and fc2)
    # one layer's down_proj scaled otherwise, named by its full module path (PEFT matches the suffix)
    prefix = "language_model." if variant == "gemma3_mm" else "model."
    alpha_pattern = {f"{prefix}layers.1.mlp.down_proj": 5}
    targets = ["o_proj", "down_proj", "q_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, alpha_pattern=alpha_pattern)
    if variant == "gemma3_mm":
        config.target_modules = r".*language_model.*\.(o_proj|down_proj|q_proj)"
    pm = peft.get_peft_model(hf, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(str(tmp_path))
    model = load_hf_model_with_adapter(d, str(tmp_path), RuntimeOptions(), mesh)
    assert model.lora.targets == ("qkv", "o_proj", "fc2")
    np.testing.assert_allclose(_logits(model), hf_logits(d, TOKENS, adapter_dir=str(tmp_path)), atol=1e-4)


@pytest.mark.parametrize("variant", ["qwen3", "gemma3", "gemma3_mm"])
def test_merged_export_loads_in_transformers(variant, mesh, tmp_path):
    """A gemma3 checkpoint's vision tower and projector are copied through untouched."""
    from safetensors import safe_open

    d = saved_hf_dir(variant)
    spec = LoraSpec(targets=("qkv", "o_proj", "fc1", "fc2"), rank=4, alpha=8)
    model = with_random_b(load_hf_model(d, spec, RuntimeOptions(), mesh), scale=0.3)
    export_merged(model, str(tmp_path), d)
    np.testing.assert_allclose(hf_logits(str(tmp_path), TOKENS), _logits(model), atol=1e-4)
    with safe_open(f"{d}/model.safetensors", "np") as src, safe_open(f"{tmp_path}/model.safetensors", "np") as out:
        assert set(out.keys()) == set(src.keys())
        for key in (k for k in src.keys() if k.startswith(("vision_tower.", "multi_modal_projector."))):
            np.testing.assert_array_equal(out.get_tensor(key), src.get_tensor(key))


# gemma-3-4b-it's config.json as the Hub has it: its text_config names only what differs from
# transformers' Gemma3TextConfig defaults, in the legacy RoPE keys.
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "vision_config": {"model_type": "siglip_vision_model", "vision_use_head": False},
}


@pytest.mark.parametrize(
    "text",
    [
        GEMMA3_4B["text_config"],
        dict(GEMMA3_4B["text_config"], rope_theta=2e6, rope_local_base_freq=5e3, sliding_window_pattern=4),
        dict(
            GEMMA3_4B["text_config"],
            rope_scaling=None,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0}, "sliding_attention": {}},
            rope_local_base_freq=5e3,
        ),
    ],
)
def test_a_sparse_hub_gemma3_config_reads_as_transformers_reads_it(text):
    import transformers

    from lora_jax.model.config import model_config_from_hf

    ours = model_config_from_hf(dict(GEMMA3_4B, text_config=text))
    theirs = transformers.Gemma3Config(**dict(GEMMA3_4B, text_config=text)).text_config
    assert (ours.hidden_size, ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        theirs.hidden_size,
        theirs.num_hidden_layers,
        theirs.num_attention_heads,
        theirs.num_key_value_heads,
        theirs.head_dim,
    )
    assert ours.vocab_size == theirs.vocab_size and ours.query_pre_attn_scalar == theirs.query_pre_attn_scalar
    windows = tuple(theirs.sliding_window if t == "sliding_attention" else None for t in theirs.layer_types)
    assert ours.sliding_windows == windows
    full, local = theirs.rope_parameters["full_attention"], theirs.rope_parameters["sliding_attention"]
    assert (ours.rope.rope_type, ours.rope.theta, ours.rope.factor) == (
        full["rope_type"],
        full["rope_theta"],
        full.get("factor", 1.0),
    )
    assert (ours.rope_local.rope_type, ours.rope_local.theta) == (local["rope_type"], local["rope_theta"])
    assert ours.tie_word_embeddings and ours.hidden_act == theirs.hidden_activation


@pytest.mark.parametrize(
    "cfg",
    [
        {"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 64},
        {"model_type": "qwen3", "num_key_value_heads": None, "use_sliding_window": True, "num_hidden_layers": 30},
    ],
)
def test_a_sparse_qwen3_config_reads_as_transformers_reads_it(cfg):
    import transformers

    from lora_jax.model.config import model_config_from_hf

    ours, theirs = model_config_from_hf(cfg), transformers.Qwen3Config(**cfg)
    assert (ours.vocab_size, ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        theirs.vocab_size,
        theirs.num_hidden_layers,
        theirs.num_attention_heads,
        theirs.num_key_value_heads,
        theirs.head_dim,
    )
    assert ours.max_position_embeddings == theirs.max_position_embeddings and ours.qk_norm
    windows = tuple(theirs.sliding_window if t == "sliding_attention" else None for t in theirs.layer_types)
    assert ours.sliding_windows == (windows if any(windows) else ())
