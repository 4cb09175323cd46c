"""Building a run's parts from its config: the model, the tokenizer dir, the data iterators, the run's
identity (what a checkpoint must agree with), its workdir, metric writers and arm run names.

Used by training and by mode=eval alike, so both see the same model, data and prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import ml_collections
from etils import epath
from flax import nnx

from data.datasets import IMAGE_DATASETS
from eval.events import EventWriter, LoggingWriter
from lora_jax.errors import WorkdirError
from lora_jax.io.hf_checkpoint import HFCheckpoint, load_hf_model
from lora_jax.lora.arms import TARGETS
from lora_jax.lora.bank import AdapterBank
from lora_jax.lora.delta import init_adapters
from lora_jax.model import init as initial
from lora_jax.model.arm_views import ArmViews
from lora_jax.model.transformer import Transformer
from lora_jax.multihost import decided_on_process_0
from lora_jax.run.config import (
    RESUMABLE_CHANGES,
    check_hf_conflicts,
    lora_spec,
    random_llava_config,
    random_model_config,
    runtime_options,
    validate,
)
from lora_jax.run.planted import TOKENIZER as PLANTED_TOKENIZER
from lora_jax.run.planted import teacher_data_matches, write_teacher_data
from lora_jax.sharding import make_mesh, process_rows, shard_model, variable_sharding

RANDOM_BASE_SEED = 0  # a random base (runlocal) is the same for every train.seed, like a real checkpoint


def build_model(config, mesh, lora=None) -> tuple[Transformer, str]:
    """The model (base weights + fresh adapters) on `mesh`, and a fingerprint of its base. Writes nothing.

    lora: the config's own LoraSpec by default; an AdapterBank gives a bank model whose adapters are
    then drawn by `build_bank_model`."""
    spec, opts = lora or lora_spec(config), runtime_options(config)
    if config.data.name in IMAGE_DATASETS:
        return build_llava_model(config, spec, opts, mesh)
    if config.model.hf_dir:
        ckpt = HFCheckpoint(config.model.hf_dir)
        check_hf_conflicts(config, ckpt.config, config.model.hf_dir)
        model = load_hf_model(config.model.hf_dir, spec, opts, mesh, seed=config.train.seed, ckpt=ckpt)
        fingerprint = ckpt.fingerprint()
    else:
        cfg = random_model_config(config)
        model = Transformer(cfg, spec, opts, rngs=nnx.Rngs(RANDOM_BASE_SEED))
        shard_model(model, mesh)
        init_adapters(model, config.train.seed)
        fingerprint = _random_fingerprint("random-", cfg, opts)
    return model, fingerprint


def _random_fingerprint(prefix: str, cfg, opts) -> str:
    """A random base is decided by its shape, RANDOM_BASE_SEED, the dtype its weights are drawn in and
    how they are drawn (model/init.py's DRAW_RULE: a workdir or adapter of an earlier rule is refused)."""
    decided_by = f"{cfg}{RANDOM_BASE_SEED}{opts.param_dtype}{initial.DRAW_RULE}"
    text = getattr(cfg, "text", cfg)  # a LlavaConfig's language model
    if text.initializer_range != 0.02:  # the default draws keep the fingerprints they always had
        decided_by += f" initializer_range={text.initializer_range}"
    if text.family_repr:  # a Qwen3 / Gemma 3 random base (model.family); a Llama one keeps its fingerprint
        decided_by += f" {text.family_repr}"
    return prefix + hashlib.sha256(decided_by.encode()).hexdigest()[:16]


def base_fingerprint(config) -> str:
    """The fingerprint `build_model` gives the config's base, without building the model (reads only
    the checkpoint's config and a few values of each tensor): what an adapter is checked against
    before anything is written."""
    if config.model.hf_dir:
        return HFCheckpoint(config.model.hf_dir).fingerprint()
    opts = runtime_options(config)
    if config.data.name in IMAGE_DATASETS:
        return _random_fingerprint("random-llava-", random_llava_config(config), opts)
    return _random_fingerprint("random-", random_model_config(config), opts)


def build_llava_model(config, spec, opts, mesh):
    """The image datasets' model: a LLaVA checkpoint (model.hf_dir), else a random tiny one (model.vision)."""
    from lora_jax.io.llava_checkpoint import load_llava
    from lora_jax.model.llava import Llava

    if config.model.hf_dir:
        ckpt = HFCheckpoint(config.model.hf_dir)
        check_hf_conflicts(config, ckpt.config, config.model.hf_dir)
        return load_llava(config.model.hf_dir, spec, opts, mesh, seed=config.train.seed, ckpt=ckpt), ckpt.fingerprint()
    cfg = random_llava_config(config)
    model = Llava(cfg, spec, opts, rngs=nnx.Rngs(RANDOM_BASE_SEED))
    shard_model(model, mesh)
    init_adapters(model.language, config.train.seed)
    return model, _random_fingerprint("random-llava-", cfg, opts)


def image_inputs(model, config) -> dict:
    """SFTOptions fields for a LLaVA model: the placeholder id, placeholders per image, the image
    processor (the checkpoint's preprocessor_config.json, or a plain resize for a random tower)."""
    if not hasattr(model, "llava_config"):
        return {}
    from data.image_processing import ImageProcessor

    cfg = model.llava_config
    if config.model.hf_dir:
        processor = ImageProcessor.from_config(str(epath.Path(config.model.hf_dir) / "preprocessor_config.json"))
    else:
        processor = ImageProcessor(height=cfg.vision.image_size, width=cfg.vision.image_size)
    return {
        "image_token_id": cfg.image_token_id,
        "tokens_per_image": cfg.tokens_per_image,
        "image_processor": processor,
    }


def build_bank_model(configs: list, names: list[str], mesh) -> tuple[Transformer, str, ArmViews]:
    """One base with the K arms' adapters (an AdapterBank), each arm's fresh adapters exactly those
    its own run would draw; also the arms' views. The arms' configs must agree on everything but the
    adapters (checked by the caller)."""
    bank = AdapterBank(tuple(names), tuple(lora_spec(c) for c in configs))
    model, fingerprint = build_model(configs[0], mesh, lora=bank)
    views = ArmViews.build(model.config, bank, model.options)
    lora = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, views.init_bank_lora(lora, configs[0].train.seed))
    return model, fingerprint, views


def rebank_model(model: Transformer, bank: AdapterBank, mesh) -> Transformer:
    """The model's base (its frozen arrays, shared, not copied) under another adapter bank, whose
    adapters start at zero (the caller stacks the arms' states in): what successive halving trains
    once arms have left. No base weight is drawn or read again."""
    abstract = nnx.eval_shape(lambda: Transformer(model.config, bank, model.options, rngs=nnx.Rngs(0)))
    graphdef, lora, _ = nnx.split(abstract, nnx.LoRAParam, ...)
    _, _, frozen = nnx.split(model, nnx.LoRAParam, ...)
    lora = jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), lora)
    rebanked = nnx.merge(graphdef, lora, frozen)
    for _, var in nnx.to_flat_state(nnx.state(rebanked, nnx.LoRAParam)):
        var.set_value(jax.device_put(var.get_value(), variable_sharding(var, mesh)))
    return rebanked


def tokenizer_dir(config, workdir: epath.Path) -> str:
    """data.tokenizer_dir, else model.hf_dir, else (random model) the bundled tiny tokenizer written to
    workdir (by process 0; the others wait for it). A planted study's examples are token ids: its
    tokenizer is the ids tokenizer the teacher wrote beside them (prepare_planted)."""
    if config.data.name == "planted":
        return str(epath.Path(manual_dir(config, workdir)) / PLANTED_TOKENIZER)
    return base_tokenizer_dir(config, workdir)


def base_tokenizer_dir(config, workdir: epath.Path) -> str:
    """The base model's own tokenizer: data.tokenizer_dir, model.hf_dir, or the bundled one (written)."""
    tok_dir = config.data.tokenizer_dir or config.model.hf_dir
    if tok_dir is None:  # a random model (runlocal): the tiny byte-level tokenizer its vocab was sized for
        from data import samples

        tok_dir = workdir / "bundled" / "tokenizer"
        image = config.data.name in IMAGE_DATASETS  # with LLaVA's <image> placeholder
        _on_process_0_then_all(lambda: samples.write_tiny_tokenizer(tok_dir, image_token=image), "bundled tokenizer")
    return str(tok_dir)


def prepare_planted(config, workdir: epath.Path, mesh) -> None:
    """data.name="planted" without data.manual_dir: the teacher's data in <workdir>/planted, made once
    from a fresh copy of the base (every process takes part in its generation; process 0 writes)
    and reused while its planted settings and base are unchanged."""
    from data.tokenizer import load_tokenizer

    if config.data.name != "planted" or config.data.manual_dir is not None:
        return
    manual = epath.Path(manual_dir(config, workdir))
    end_of_turn = load_tokenizer(base_tokenizer_dir(config, workdir)).end_of_turn_id
    if teacher_data_matches(manual, config, base_fingerprint(config), end_of_turn):
        return
    teacher, fingerprint = build_model(config, mesh)
    write_teacher_data(config, teacher, fingerprint, end_of_turn, manual, mesh, write=jax.process_index() == 0)
    _on_process_0_then_all(lambda: None, "planted teacher data")


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
    if d.name == "planted" and d.manual_dir is None:  # written by the run's teacher (prepare_planted)
        return str(workdir / "planted")
    if d.manual_dir is None and d.use_bundled_samples:
        return str(workdir / "bundled" / d.name)
    return d.manual_dir


def data_source_manifest(config) -> dict | None:
    """What the run's dataset is built from (files, sizes, mtimes, builder options); None for the bundled
    runlocal samples, which data/samples.py writes deterministically. Reads only."""
    from data.prepare import source_manifest

    d = config.data
    if d.manual_dir is None and (d.use_bundled_samples or d.name == "planted"):
        return None  # a planted teacher's data is decided by config.planted and the base (run_identity)
    return source_manifest(d.name, d.manual_dir, bad_images=d.bad_images)


# Files of a tokenizer directory that decide the ids and the chat template (data/tokenizer.py reads them;
# the rest are transformers' duplicates of the same content).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
)


def files_digest(directory, names) -> str:
    """sha256 (first 16 hex digits) over the contents of the named files the directory holds, each
    with its name: a file's bytes decide it, not its path or mtime."""
    d = epath.Path(directory)
    h = hashlib.sha256()
    for name in names:
        path = d / name
        if path.exists():
            data = path.read_bytes()
            h.update(f"{name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()[:16]


def tokenizer_identity(config) -> str:
    """The tokenizer and chat template a run renders its examples with: the digest of the files in
    data.tokenizer_dir (else model.hf_dir's own); "bundled" for the runlocal tokenizer, which
    data/samples.py writes deterministically."""
    if config.data.name == "planted":
        return "planted-token-ids"  # the examples are ids: no tokenizer renders them
    tok_dir = config.data.tokenizer_dir or config.model.hf_dir
    return files_digest(tok_dir, TOKENIZER_FILES) if tok_dir else "bundled"


def run_identity(config, fingerprint: str, data_source: str) -> dict:
    """What a checkpoint must agree with to be resumed: the adapters' shape, the base (its fingerprint,
    and the dtypes it is loaded and computed in), the tokenizer and chat template, a LLaVA checkpoint's
    image processor, the data and the schedule (a resumed run must see the batches and learning rates
    an uninterrupted one would). Keys added later are absent from older checkpoints, which still match
    (io.checkpoints.CheckpointStore)."""
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
            **({"layers": list(spec.layers)} if spec.layers else {}),  # absent when all: older checkpoints match
        },
        "base_fingerprint": fingerprint,
        "model.param_dtype": config.model.param_dtype,
        "model.compute_dtype": config.model.compute_dtype,
        "tokenizer": tokenizer_identity(config),
        "dataset": config.data.name,
        "data_source": data_source,
    }
    if config.data.name == "planted":  # the teacher the data came from
        identity["planted"] = config.planted.to_dict()
    if config.data.name in IMAGE_DATASETS and config.model.hf_dir:  # a random tower resizes to its image_size
        identity["image_processor"] = files_digest(config.model.hf_dir, ("preprocessor_config.json",))
    for key in RESUMABLE_CHANGES:
        if "." in key:
            section, name = key.split(".")
            value = config[section][name]
            identity[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    return json.loads(json.dumps(identity))  # as it reads back from the checkpoint's JSON


# What a checkpoint saved before these keys joined the run identity trained with.
IDENTITY_BEFORE = {
    "optim.loraplus_ratio": 1.0,
    "optim.lr_per_target": {t: 1.0 for t in TARGETS},
    "data.enable_thinking": None,
}


@dataclasses.dataclass
class RunData:
    train: object  # PackedBatchIterator over the training split (shuffled, endless)
    eval_iterator: object  # () -> a fresh one-pass PackedBatchIterator over the test split
    sources: dict  # split -> tfds data source (records of the common schema)
    tokenizer: object  # data.tokenizer.Tokenizer
    sft_options: object  # data.sft.SFTOptions of training (prompts are rendered and cut the same way)
    train_iterator: object = None  # () -> a fresh PackedBatchIterator giving the batches `train` starts with


def data_iterators(config, workdir: epath.Path, tokenizer_dir: str, vocab_size: int, sharding, images=None) -> RunData:
    """The run's data: iterators for training and the loss evaluation, the splits, the tokenizer.
    images: `image_inputs(model, config)` for a LLaVA model (the examples then carry their pixels).

    Process 0 prepares the tfds dataset; the others wait. Each process materialises exactly the
    global batch rows its devices hold under the batch `sharding`."""
    from jax.experimental import multihost_utils

    from data import samples
    from data.pipeline import PackedBatchIterator
    from data.prepare import open_sources, prepare
    from data.sft import SFTOptions
    from data.tokenizer import load_tokenizer

    d = config.data
    manual = manual_dir(config, workdir)
    if d.manual_dir is None and d.use_bundled_samples and d.name != "planted":  # planted: prepare_planted's
        _on_process_0_then_all(lambda: samples.write_sample_manual_dir(d.name, manual), "bundled samples")
    data_dir = d.data_dir or str(workdir / "tfds")
    if jax.process_index() == 0:
        prepare(d.name, manual, data_dir, bad_images=d.bad_images)
    multihost_utils.sync_global_devices("tfds prepared")
    sources = open_sources(d.name, data_dir, bad_images=d.bad_images)
    tok = load_tokenizer(tokenizer_dir, d.reasoning_traces, d.render_date, d.enable_thinking)
    opts = SFTOptions(
        d.max_seq_len, d.max_target_tokens, d.truncation, d.reasoning_traces, vocab_size, **(images or {})
    )
    eval_opts = dataclasses.replace(opts, keep_all=True)  # evaluation never drops an example
    b_train, b_eval = config.train.global_batch_size, config.eval.batch_size
    train_rows, eval_rows = process_rows(sharding, b_train), process_rows(sharding, b_eval)

    def train_iterator():
        return PackedBatchIterator(
            sources["train"], tok, opts, b_train, seed=config.train.seed, pack=d.pack, rows=train_rows
        )

    def eval_iterator():
        return PackedBatchIterator(sources["test"], tok, eval_opts, b_eval, train=False, pack=d.pack, rows=eval_rows)

    return RunData(train_iterator(), eval_iterator, sources, tok, opts, train_iterator)


def dataset_counts(config, workdir: epath.Path) -> dict[str, int]:
    """What the dataset builder dropped, kept or de-duplicated (its info metadata counts)."""
    from data.prepare import builder_class

    d = config.data
    builder = builder_class(d.name)(data_dir=d.data_dir or str(workdir / "tfds"), bad_images=d.bad_images)
    return {k: int(v) for k, v in builder.info.metadata.items() if isinstance(v, (int, float))}


def open_checkpoint_store(config, workdir: epath.Path, fingerprint: str):
    """The workdir's CheckpointStore, refusing (WorkdirMismatchError, naming what differs) a workdir
    that holds another run's checkpoints, before anything is written; records the data source."""
    from data.prepare import describe_change, manifest_digest
    from lora_jax.io.checkpoints import CheckpointStore, WorkdirMismatchError
    from lora_jax.io.files import write_text_atomic

    source = data_source_manifest(config)
    identity = run_identity(config, fingerprint, manifest_digest(source) if source else f"bundled:{config.data.name}")
    try:
        store = CheckpointStore(
            str(workdir),
            config.train.max_to_keep,
            identity,
            allowed_changes=tuple(config.train.allow_changed_on_resume),
            absent=IDENTITY_BEFORE,
        )
    except WorkdirMismatchError as e:
        recorded = workdir / "data_source.json"
        if "data_source" in e.keys and source and recorded.exists():
            change = describe_change(json.loads(recorded.read_text()), source)
            raise WorkdirMismatchError(f"{e} [data.manual_dir: {change}]", e.keys) from None
        hints = {
            "tokenizer": f"the tokenizer/chat template files in {config.data.tokenizer_dir or config.model.hf_dir}",
            "image_processor": f"{config.model.hf_dir}/preprocessor_config.json",
        }
        changed = [f"{k}: {what} changed" for k, what in hints.items() if k in e.keys]
        if changed:
            raise WorkdirMismatchError(f"{e} [{'; '.join(changed)}]", e.keys) from None
        raise
    if source and jax.process_index() == 0:
        write_text_atomic(workdir / "data_source.json", json.dumps(source, indent=1))
    return store


def check_workdir_writable(workdir: epath.Path) -> None:
    """Creates the workdir and writes (then removes) a probe file there, on process 0, before anything
    heavy runs; a read-only or full disk is reported with the path now, not after model building."""

    def probe() -> str:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            probe_file = workdir / f".write_probe.{os.getpid()}"
            probe_file.write_text("ok")
            probe_file.unlink()
        except OSError as e:
            return f"--workdir {workdir} is not writable ({e.strerror or e})"
        return ""

    error = decided_on_process_0(probe)
    if error:
        raise WorkdirError(error)


def metric_writer(workdir: epath.Path) -> EventWriter:
    """The run's TensorBoard events (process 0; the others only log their scalars)."""
    return EventWriter(workdir) if jax.process_index() == 0 else LoggingWriter(workdir)


def start_run(config: ml_collections.ConfigDict, workdir: str):
    """Every check that needs no data (before anything is written), then the mesh and the model:
    (workdir, mesh, model, base fingerprint). Training and mode=eval start the same way."""
    validate(config)  # every config check, the evaluators' included
    workdir = epath.Path(workdir)
    check_workdir_writable(workdir)
    mesh = make_mesh(config.mesh.shape)
    model, fingerprint = build_model(config, mesh)
    return workdir, mesh, model, fingerprint


SHARED_DIR = "joint"  # <workdir>/joint: what the arms share (prepared data, bundled samples)


def run_name(config: ml_collections.ConfigDict) -> str:
    """The arm's workdir name, as the study sweep names its run."""
    return f"{config.data.name}_{config.arm}_s{config.train.seed}"
