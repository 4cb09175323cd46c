"""Config -> the objects a run is made of, and every check that can fail before anything runs.

`validate` refuses a config with one clear ConfigError (or a missing-file error) naming the key
and what was expected, before any file is written or any program compiled.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from data.datasets import DATASETS, IMAGE_DATASETS
from lora_jax.errors import CheckpointError, ConfigError, MissingFileError
from lora_jax.lora.arms import ARMS, TARGETS, arm_name, parse_arm, validate_targets
from lora_jax.lora.spec import LoraSpec
from lora_jax.model.attention import get_attention_impl
from lora_jax.model.config import ModelConfig, RopeConfig
from lora_jax.model.transformer import REMAT_POLICIES, RuntimeOptions
from lora_jax.run.halving import check_halving
from lora_jax.run.planted import check_planted
from lora_jax.sharding import check_serving_mesh, resolve_mesh_shape
from lora_jax.train.accounting import budget_rank
from lora_jax.train.step import LrScale

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODEL_DIMS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


def _dtype(name: str, key: str):
    if name not in DTYPES:
        raise ConfigError(f"{key}={name!r} is unknown; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def lr_scale(config: ml_collections.ConfigDict) -> LrScale:
    """The arm's learning-rate multipliers (optim.lr_per_target, optim.loraplus_ratio)."""
    o = config.optim
    return LrScale(tuple((t, float(o.lr_per_target[t])) for t in TARGETS), float(o.loraplus_ratio))


def lora_spec(config: ml_collections.ConfigDict) -> LoraSpec:
    """The arm's adapters. With lora.param_budget, one rank for all its targets, solved so that the
    arm trains about that many parameters (`budget_rank`): the equal-budget version of the study."""
    lo = config.lora
    rank = lo.rank
    if lo.param_budget:
        if lo.param_budget < 0:
            raise ConfigError(f"lora.param_budget={lo.param_budget} must be > 0 (or 0 = off)")
        if any(v is not None for v in lo.rank_overrides.values()):
            raise ConfigError("lora.param_budget solves the rank: it cannot be combined with lora.rank_overrides")
        rank = budget_rank(model_config_of(config), tuple(lo.targets), lo.param_budget, tuple(lo.layers))
    return LoraSpec(
        targets=tuple(lo.targets),
        rank=rank,
        alpha=lo.alpha,
        dropout=lo.dropout,
        use_rslora=lo.use_rslora,
        rank_overrides=dict(lo.rank_overrides),
        alpha_overrides=dict(lo.alpha_overrides),
        layers=tuple(lo.layers),
    )


def model_config_of(config: ml_collections.ConfigDict) -> ModelConfig:
    """The model's shape: config.json of model.hf_dir, else the random-init dimensions."""
    if config.model.hf_dir:
        from lora_jax.io.hf_checkpoint import load_hf_model_config

        path = epath.Path(config.model.hf_dir) / "config.json"
        if not path.exists():
            raise MissingFileError(f"model.hf_dir: {config.model.hf_dir} has no config.json")
        return load_hf_model_config(str(config.model.hf_dir))
    return random_model_config(config)


def runtime_options(config: ml_collections.ConfigDict) -> RuntimeOptions:
    m = config.model
    return RuntimeOptions(
        param_dtype=_dtype(m.param_dtype, "model.param_dtype"),
        compute_dtype=_dtype(m.compute_dtype, "model.compute_dtype"),
        attention_impl=m.attention_impl,
        scan_layers=m.scan_layers,
        remat=m.remat,
    )


RANDOM_GEMMA3_WINDOW = 64  # a random Gemma 3's sliding window: shorter than runlocal's rows, so it bites


def _family_features(family: str, m: ml_collections.ConfigDict) -> dict:
    """The ModelConfig switches of a random model of `family` (model.family)."""
    if family == "qwen3":
        return dict(model_type="qwen3", qk_norm=True)
    if family == "gemma3":
        n = int(m.num_layers)
        # Gemma 3 alternates 5 sliding layers with a global one; a tiny model alternates 1 and 1.
        windows = tuple(RANDOM_GEMMA3_WINDOW if i % 2 == 0 else None for i in range(n))
        return dict(
            model_type="gemma3_text",
            qk_norm=True,
            gemma_norms=True,
            hidden_act="gelu_pytorch_tanh",
            embed_scale=True,
            query_pre_attn_scalar=float(m.head_dim),
            tie_word_embeddings=True,
            sliding_windows=windows,
            rope=RopeConfig(theta=1_000_000.0),
            rope_local=RopeConfig(theta=10_000.0),
        )
    return {}


FAMILIES = ("llama", "qwen3", "gemma3")


def random_model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    m = config.model
    missing = [k for k in MODEL_DIMS if m[k] is None]
    if missing:
        raise ConfigError(
            "model.hf_dir is unset: set --config.model.hf_dir=<local Hugging Face checkpoint dir> and "
            "--config.data.manual_dir=<the dataset's upstream files> (README: 'A real arm'), or run the tiny "
            f"random model with the config suffix :runlocal (random init needs model.{', model.'.join(missing)})"
        )
    small = [f"model.{k}={m[k]}" for k in MODEL_DIMS if m[k] < 1]
    if small:
        raise ConfigError(f"{', '.join(small)}: model dimensions must be >= 1")
    if not m.initializer_range > 0:
        raise ConfigError(f"model.initializer_range={m.initializer_range} must be > 0")
    if m.family not in FAMILIES:
        raise ConfigError(f"model.family={m.family!r} is unknown; valid: {', '.join(FAMILIES)}")
    return ModelConfig(
        **{k: int(m[k]) for k in MODEL_DIMS},
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=1e-6,
        initializer_range=float(m.initializer_range),
        **_family_features(m.family, m),
    )


def check_hf_conflicts(config: ml_collections.ConfigDict, hf: ModelConfig, source: str) -> None:
    """When model.hf_dir is set its config.json is the truth; a different value in our config is an error."""
    if config.model.family != "llama":
        raise ConfigError(
            f"model.family={config.model.family!r} is for a random model; with model.hf_dir, "
            f"{source}/config.json's model_type ({hf.model_type}) decides the family"
        )
    for key in MODEL_DIMS:
        ours = config.model[key]
        if ours is not None and ours != getattr(hf, key):
            raise ConfigError(f"model.{key}={ours} conflicts with {source}/config.json ({getattr(hf, key)})")


def _section(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """("train.divergence.patience") -> (config.train.divergence, "patience"): nested sections."""
    *sections, name = key.split(".")
    for section in sections:
        config = config[section]
    return config, name


def _check_range(config: ml_collections.ConfigDict, key: str, low, high=None) -> None:
    section, name = _section(config, key)
    value = section[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ConfigError(f"{key}={value!r} must be {bound}")


# Every numeric field with its valid range [low, high).
RANGES = {
    "lora.rank": (1,),
    "lora.alpha": (1e-12,),
    "lora.dropout": (0, 1),
    "data.max_seq_len": (8,),
    "data.max_target_tokens": (1,),
    "optim.learning_rate": (1e-12,),
    "optim.loraplus_ratio": (1e-12,),
    **{f"optim.lr_per_target.{t}": (1e-12,) for t in TARGETS},
    "optim.warmup_steps": (0,),
    "optim.weight_decay": (0,),
    "optim.grad_clip_norm": (0,),
    "optim.grad_accum_steps": (1,),
    "train.total_steps": (1,),
    "train.global_batch_size": (1,),
    "train.seed": (0,),
    "train.log_every_steps": (1,),
    "train.checkpoint_every_steps": (1,),
    "train.max_to_keep": (1,),
    "train.loss_chunk_tokens": (1,),
    "train.divergence.max_norm_growth": (0,),
    "train.divergence.max_loss_rise": (0,),
    "train.divergence.patience": (1,),
    "eval.eval_every_steps": (0,),
    "eval.max_eval_batches": (0,),
    "eval.batch_size": (1,),
    "eval.samples_to_log": (0,),
    "model.max_position_embeddings": (1,),
}
MODES = ("train", "eval")
# eval.latency: each setting's minimum. warmup >= 1 so that compilation never lands in a timed request.
LATENCY_MINIMA = {"batch_size": 1, "prompt_tokens": 1, "new_tokens": 2, "requests": 1, "warmup": 1}
VISION_DIMS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size")
# Settings a resumed run may change when the user lists them in train.allow_changed_on_resume.
RESUMABLE_CHANGES = (
    "data.max_seq_len",
    "data.max_target_tokens",
    "data.truncation",
    "data.pack",
    "data.reasoning_traces",
    "data.render_date",
    "data.enable_thinking",
    "data.bad_images",
    "data_source",
    "lora.dropout",
    "optim.learning_rate",
    "optim.warmup_steps",
    "optim.weight_decay",
    "optim.grad_clip_norm",
    "optim.grad_accum_steps",
    "optim.lr_per_target",
    "optim.loraplus_ratio",
    "train.total_steps",
    "train.global_batch_size",
    "train.seed",
)


def _check_dir(key: str, path: str | None, must_hold: str | None = None) -> None:
    if path is None:
        return
    p = epath.Path(path)
    if not p.is_dir():
        raise MissingFileError(f"{key}: no such directory: {path}")
    if must_hold and not (p / must_hold).exists():
        raise MissingFileError(f"{key}: {path} has no {must_hold}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Every check that needs no data and no compilation: fails fast with one clear ConfigError, before
    anything is written."""
    from data.chat_template import parse_render_date
    from data.images import BAD_IMAGE_POLICIES
    from data.sft import TRUNCATIONS

    if config.mode not in MODES:
        raise ConfigError(f"mode={config.mode!r} is unknown; valid: {', '.join(MODES)}")
    for key, bounds in RANGES.items():
        _check_range(config, key, *bounds)
    lora_spec(config)
    runtime_options(config)
    if config.model.remat not in REMAT_POLICIES:
        raise ConfigError(f"model.remat={config.model.remat!r} is unknown; valid: {', '.join(REMAT_POLICIES)}")
    get_attention_impl(config.model.attention_impl)
    d = config.data
    if d.name not in DATASETS:
        raise ConfigError(f"data.name={d.name!r} is unknown; valid: {', '.join(DATASETS)}")
    if d.name in IMAGE_DATASETS and d.pack:
        raise ConfigError(f"data.pack=True with data.name={d.name!r}: image examples are not packed (one per row)")
    if d.truncation not in TRUNCATIONS:
        raise ConfigError(f"data.truncation={d.truncation!r} is unknown; valid: {', '.join(TRUNCATIONS)}")
    try:
        parse_render_date(d.render_date)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if d.enable_thinking is False and d.reasoning_traces:
        raise ConfigError(
            "data.enable_thinking=False with data.reasoning_traces=True: the non-thinking prompt already holds an "
            "empty <think> block, so a trace cannot follow it; set one of them otherwise"
        )
    if d.bad_images not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"data.bad_images={d.bad_images!r} is unknown; valid: {', '.join(BAD_IMAGE_POLICIES)}")
    if d.max_target_tokens >= d.max_seq_len:
        raise ConfigError(
            f"data.max_target_tokens={d.max_target_tokens} must be below data.max_seq_len={d.max_seq_len}"
        )
    unknown = sorted(set(config.train.allow_changed_on_resume) - set(RESUMABLE_CHANGES))
    if unknown:
        raise ConfigError(
            f"train.allow_changed_on_resume has {', '.join(unknown)}; valid: {', '.join(RESUMABLE_CHANGES)}"
        )
    check_evaluators(config)
    sizes = resolve_mesh_shape(config.mesh.shape, jax.device_count())
    data_parallel = sizes[0] * sizes[1]
    accum = config.optim.grad_accum_steps
    b = config.train.global_batch_size
    if b % accum or (b // accum) % data_parallel:
        raise ConfigError(
            f"train.global_batch_size={b} must split into {accum} micro-batches whose rows divide the "
            f"data x fsdp mesh axes ({data_parallel})"
        )
    if config.eval.batch_size % data_parallel:
        raise ConfigError(f"eval.batch_size={config.eval.batch_size} must divide by data x fsdp ({data_parallel})")
    _check_dir("model.hf_dir", config.model.hf_dir, "config.json")
    _check_dir("data.tokenizer_dir", d.tokenizer_dir)
    _check_dir("eval.adapter_dir", config.eval.adapter_dir, "adapter_config.json")
    check_arm_label(config)
    if d.name in IMAGE_DATASETS:
        check_vision_tower(config)
        if d.name in config.eval.suites and config.eval.suites[d.name].teacher_forced:
            raise ConfigError(f"eval.suites.{d.name}.teacher_forced=True: teacher-forced scoring takes no images")
    text = model_config_of(config)
    if config.model.hf_dir:  # before anything is written (build_model checks it again, on the loaded checkpoint)
        check_hf_conflicts(config, text, config.model.hf_dir)
    check_model_fits(config, text)
    if "latency" in config.eval.evaluators:  # settings of an evaluator that does not run are not checked
        check_latency(config, text.max_position_embeddings, image_tokens(config, text))
        check_serving_mesh(config.eval.latency.mesh, text.num_kv_heads)
    if d.name == "planted":
        check_planted(config, text.num_layers)
    if not d.use_bundled_samples and not (d.name == "planted" and d.manual_dir is None):
        from data.prepare import check_manual_dir

        check_manual_dir(d.name, d.manual_dir)
    check_halving(config)
    if config.arms:
        check_arms(config)
        for arm in config.arms:
            validate(arm_config(config, arm))


def check_model_fits(config: ml_collections.ConfigDict, text: ModelConfig) -> None:
    """What the model (its config.json, or the random-init dimensions) bounds: lora.layers within its
    layers, and a training row (data.max_seq_len tokens) within its context. The model refuses both
    too, but only once it is built or run: after the workdir and the prepared data are written."""
    layers = tuple(config.lora.layers)
    if layers and max(layers) >= text.num_layers:
        raise ConfigError(f"lora.layers={layers}: the model has layers 0..{text.num_layers - 1}")
    if config.data.max_seq_len > text.max_position_embeddings:
        raise ConfigError(
            f"data.max_seq_len={config.data.max_seq_len} passes the model's context "
            f"(max_position_embeddings={text.max_position_embeddings})"
        )


def check_evaluators(config: ml_collections.ConfigDict) -> None:
    """eval.evaluators names registered evaluators, and the dataset's suite is valid."""
    from eval.evaluators import check_evaluators as check
    from eval.suites import EvalConfigError

    try:
        check(config)
    except EvalConfigError as e:
        raise ConfigError(str(e)) from None


def check_latency(config: ml_collections.ConfigDict, context: int, image_tokens: int = 0) -> None:
    """eval.latency: every setting at least its minimum, and a request's sequence within the context:
    image_tokens (a LLaVA's placeholders of the one image latency.Requests puts before the prompt)
    + prompt_tokens + new_tokens."""
    s = config.eval.latency
    for key, low in LATENCY_MINIMA.items():
        value = s[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"eval.latency.{key}={value!r} must be an integer >= {low}")
    total = image_tokens + s.prompt_tokens + s.new_tokens
    if total > context:
        terms = f"prompt_tokens + new_tokens = {total}"
        if image_tokens:  # name the placeholders: the config's own numbers alone fit
            terms = (
                f"prompt_tokens + new_tokens + the image's tokens_per_image = {s.prompt_tokens} + {s.new_tokens} + "
                f"{image_tokens} = {total}"
            )
        raise ConfigError(f"eval.latency.{terms} passes the model's context ({context})")


def image_tokens(config: ml_collections.ConfigDict, text: ModelConfig) -> int:
    """Placeholder tokens per image (LlavaConfig.tokens_per_image) of an image dataset's model: the
    LLaVA checkpoint's config.json (model.hf_dir), else the random tower of model.vision; 0 for a text
    dataset. Needs check_vision_tower to have passed."""
    if config.data.name not in IMAGE_DATASETS:
        return 0
    if config.model.hf_dir:
        from lora_jax.model.llava import llava_config_from_hf

        path = epath.Path(config.model.hf_dir) / "config.json"
        return llava_config_from_hf(json.loads(path.read_text()), text, str(path)).tokens_per_image
    return random_llava_config(config).tokens_per_image


def check_arm_label(config: ml_collections.ConfigDict) -> None:
    """config.arm, the label a run's files carry (summary.json, eval/<suite>.json), is a study arm only
    with that arm's targets: mode=eval labels a checkpoint by its targets (`arm_name`), so a study arm
    name on other targets would file one checkpoint under two arms. Other names label the config's own
    targets as given."""
    arm = config.arm
    if "@" in str(arm) and str(arm).split("@")[0] in ARMS:  # a variant: its settings are the config's
        study_arm, settings = parse_arm(arm)
        for key, value in settings.items():
            section, name = _section(config, key)
            if section[name] != value:
                raise ConfigError(f"config.arm={arm!r} names {key}={value:g}, but the config has {section[name]!r}")
        arm = study_arm
    if arm in ARMS and validate_targets(ARMS[arm]) != validate_targets(config.lora.targets):
        raise ConfigError(
            f"config.arm={arm!r} is the study arm of targets {tuple(ARMS[arm])}, but lora.targets="
            f"{tuple(config.lora.targets)}: set config.arm={arm_name(config.lora.targets)!r} (or another name that is "
            "not a study arm)"
        )


def check_vision_tower(config: ml_collections.ConfigDict) -> None:
    """An image dataset needs a vision tower: a LLaVA checkpoint in model.hf_dir, else a random one
    described by model.vision (what configs/<image dataset>_<arm>.py:runlocal sets)."""
    name = config.data.name
    if config.model.hf_dir:
        path = epath.Path(config.model.hf_dir) / "config.json"
        try:
            model_type = json.loads(path.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError(f"{path}: invalid JSON") from None
        if model_type != "llava":
            raise ConfigError(
                f"data.name={name!r} is an image dataset: model.hf_dir={config.model.hf_dir} has no vision tower "
                f"(model_type {model_type!r}; a LLaVA checkpoint, model_type 'llava', is needed)"
            )
        return
    v = config.model.vision
    unset = [f"model.vision.{k}={v[k]}" for k in VISION_DIMS if not isinstance(v[k], int) or v[k] < 1]
    if unset:
        raise ConfigError(
            f"data.name={name!r} is an image dataset and the model has no vision tower ({', '.join(unset)}): set "
            "model.hf_dir to a LLaVA checkpoint, or every model.vision size >= 1 for a random tower "
            f"(configs/{name}_<arm>.py:runlocal sets them)"
        )
    if v.kind not in ("siglip", "clip"):
        raise ConfigError(f"model.vision.kind={v.kind!r} is unknown; valid: siglip, clip")
    if v.select_strategy not in ("full", "default"):
        raise ConfigError(f"model.vision.select_strategy={v.select_strategy!r} is unknown; valid: full, default")
    if v.patch_size > v.image_size or v.hidden_size % v.num_heads:
        raise ConfigError(
            f"model.vision: patch_size={v.patch_size} must be <= image_size={v.image_size} and "
            f"hidden_size={v.hidden_size} must divide by num_heads={v.num_heads}"
        )
    # vision.VisionTower.hidden_state's range: hidden state 0 (the embeddings) .. num_layers, or from the end
    layer = v.feature_layer
    if not isinstance(layer, int) or isinstance(layer, bool) or not -v.num_layers - 1 <= layer <= v.num_layers:
        raise ConfigError(
            f"model.vision.feature_layer={layer!r} must be an integer in [{-v.num_layers - 1}, {v.num_layers}] "
            f"(the tower has model.vision.num_layers={v.num_layers}; -1 = the last layer)"
        )
    vocab = config.model.vocab_size
    if not 0 <= v.image_token_id < vocab:
        raise ConfigError(f"model.vision.image_token_id={v.image_token_id} must be in [0, model.vocab_size={vocab})")


def check_arms(config: ml_collections.ConfigDict) -> None:
    """config.arms (a joint run): known, distinct study arms of a text dataset, trained with checkpoints
    a kill between two arms' saves cannot leave without a common step."""
    arms = tuple(config.arms)
    unknown = [a for a in arms if str(a).split("@")[0] not in ARMS]
    if unknown:
        raise ConfigError(f"config.arms has {', '.join(map(str, unknown))}; valid arms: {', '.join(ARMS)}")
    for arm in arms:
        parse_arm(arm)  # a variant's settings (arm@lp=16)
    if len(set(arms)) != len(arms):
        raise ConfigError(f"config.arms lists an arm twice: {arms}")
    if config.data.name in IMAGE_DATASETS:
        raise ConfigError(
            f"config.arms: joint training of the image datasets ({config.data.name}) is not supported yet"
        )
    if config.mode != "train":
        raise ConfigError("config.arms trains arms jointly; mode=eval scores one arm: point it at that arm's workdir")
    if config.train.max_to_keep < 2:
        raise ConfigError(
            f"train.max_to_keep={config.train.max_to_keep}: a joint run needs >= 2, so that a kill between two "
            "arms' saves leaves a step every arm still has"
        )


def arm_config(config: ml_collections.ConfigDict, arm: str) -> ml_collections.ConfigDict:
    """The config of one arm of a joint run: the config as given, with that arm's targets (the arm's own
    run: `configs/<dataset>_<arm>.py` with the same overrides)."""
    c = config.copy_and_resolve_references()  # a copy as locked and typed as the config
    study_arm, settings = parse_arm(arm)  # a variant (arm@lp=16) sets its optimizer settings
    c.arm, c.arms, c.lora.targets = arm, (), ARMS[study_arm]
    for key, value in settings.items():
        section, name = _section(c, key)
        section[name] = value
    c.train.halving.rungs = ()  # the joint run selects among its arms; an arm's own run trains to the end
    return c


def random_llava_config(config):
    """The LlavaConfig of a random LLaVA (model.vision + the random decoder's dimensions)."""
    from lora_jax.model.llava import LlavaConfig
    from lora_jax.model.vision import VisionConfig

    v = config.model.vision
    return LlavaConfig(
        vision=VisionConfig(
            v.kind, v.hidden_size, v.intermediate_size, v.num_layers, v.num_heads, v.image_size, v.patch_size
        ),
        text=random_model_config(config),
        image_token_id=v.image_token_id,
        feature_layer=v.feature_layer,
        select_strategy=v.select_strategy,
    )


def arm_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """One config per name in config.arms: the config as given, with that arm's targets (the arm's
    own run: `configs/<dataset>_<arm>.py` with the same overrides)."""
    validate(config)  # the arms' names, each arm's own config, and everything else
    return [arm_config(config, arm) for arm in config.arms]
