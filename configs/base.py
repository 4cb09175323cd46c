"""The config schema: every field, one comment each. Arm files override a few lines.

`get_config("runlocal")` (i.e. `--config=configs/<arm>.py:runlocal`) shrinks an arm to a tiny
random model, the bundled samples and a few steps so it runs on a laptop CPU in about a minute.
Plain values only: no jax, no logic beyond arithmetic.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from data.datasets import IMAGE_DATASETS
from lora_jax.lora.arms import ARMS, TARGETS

# Sequence length per dataset (GovReport reports run 30-40K tokens; CoCoHD transcripts > 20K).
MAX_SEQ_LEN = {
    "fincot": 4096,
    "govreport": 32768,
    "medmcqa": 1024,
    "medreason": 4096,
    "cocohd": 32768,
    "llavacot": 4096,
    "invoiceocr": 4096,
    "planted": 256,  # several 16-token prompts + 32-token continuations packed per row
}
# Longest target kept (longer ones are dropped and counted, never cut).
MAX_TARGET_TOKENS = {
    "fincot": 2048,
    "govreport": 1024,
    "medmcqa": 256,
    "medreason": 2048,
    "cocohd": 2048,
    "llavacot": 1024,
    "invoiceocr": 1024,
    "planted": 128,
}
# Each dataset's generation suite: (metric, max_new_tokens, examples scored (0 = the whole split)).
# The study's evaluation sets: FinQA test 1147, GovReport 837, MedMCQA 3683 (MedReason scores on the
# same rows), CoCoHD 1053, LLaVA-CoT 270, Invoice OCR 447 — the builders' test splits.
SUITES = {
    "fincot": ("finqa_accuracy", 2048, 0),
    "govreport": ("rouge_lsum", 1024, 0),
    "medmcqa": ("mcq_accuracy", 64, 0),
    "medreason": ("mcq_accuracy", 2048, 0),
    "cocohd": ("json_key_value_match", 2048, 0),
    "llavacot": ("exact_match", 1024, 0),
    "invoiceocr": ("field_accuracy", 1024, 0),
    "planted": ("teacher_agreement", 32, 0),  # max_new_tokens = planted.new_tokens
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The schema with its defaults, locked (an unknown key fails at assignment); `arg` "runlocal"
    shrinks it (apply_runlocal)."""
    config = ml_collections.ConfigDict()
    config.arm = ""  # arm token of the config file name, e.g. "oproj_fc2" (recorded in checkpoints)
    config.mode = "train"  # "train" | "eval" (score --workdir's latest checkpoint, eval.adapter_dir, or the base)
    config.arms = ()  # train these arms jointly over one base, e.g. ("oproj", "fc2"): <workdir>/<dataset>_<arm>_s<seed>/ each; () = one arm

    config.model = m = ml_collections.ConfigDict()
    m.hf_dir = config_dict.placeholder(str)  # local Hugging Face checkpoint dir; None = random init below
    # Random init only: the family of the random model (lora_jax/run/config.py FAMILIES): "llama" (also
    # Qwen2/Mistral's block) | "qwen3" (q/k norms) | "gemma3" (Gemma 3's block, a sliding layer then a
    # global one, window 64). With model.hf_dir, config.json's model_type decides.
    m.family = "llama"
    m.vocab_size = config_dict.placeholder(int)  # random init only; must agree with config.json when hf_dir is set
    m.hidden_size = config_dict.placeholder(int)  # "
    m.intermediate_size = config_dict.placeholder(int)  # "
    m.num_layers = config_dict.placeholder(int)  # "
    m.num_heads = config_dict.placeholder(int)  # "
    m.num_kv_heads = config_dict.placeholder(int)  # "
    m.head_dim = config_dict.placeholder(int)  # "
    m.max_position_embeddings = 32768  # random init only
    m.initializer_range = 0.02  # random init only: std of the normal draws (kernels, embedding, LM head)
    m.param_dtype = "bfloat16"  # frozen base weights: "bfloat16" | "float32" (LoRA + optimizer always float32)
    m.compute_dtype = "bfloat16"  # matmul inputs; norms, RoPE, softmax, logits and loss stay float32
    m.attention_impl = "chunked"  # "xla" (reference) | "chunked" (flash-style, memory-bounded) | registered kernels
    m.scan_layers = True  # run layers under one scan (program size independent of depth)
    m.remat = "dots"  # "none" | "dots" (save matmul outputs) | "full"
    # LLaVA (the image datasets): with model.hf_dir a LLaVA checkpoint supplies the tower; random init only:
    m.vision = ml_collections.ConfigDict(
        dict(
            kind="siglip",  # "siglip" | "clip"
            hidden_size=0,
            intermediate_size=0,
            num_layers=0,
            num_heads=0,
            image_size=0,  # pixels per side (resized to this)
            patch_size=0,
            feature_layer=-1,  # hidden state whose features the projector reads (-1 = the last layer)
            select_strategy="full",  # "full" | "default" (drop the class token: CLIP)
            image_token_id=0,  # the tokenizer's <image> placeholder
        )
    )

    config.lora = lo = ml_collections.ConfigDict()
    lo.targets = ("o_proj",)  # subset of ("qkv", "o_proj", "fc1", "fc2")
    lo.rank = 16  # adapter rank r
    lo.layers = ()  # adapters on these decoder layers only, e.g. (0, 1, 2, 3) (PEFT's layers_to_transform); () = all
    lo.param_budget = 0  # > 0: solve one rank for the arm's targets so it trains ~this many parameters (0 = off)
    lo.alpha = 32.0  # scale = alpha / r (alpha / sqrt(r) with rsLoRA)
    lo.dropout = 0.0  # dropout on the LoRA input (PEFT's default 0); randomness = f(seed, step, layer)
    lo.use_rslora = False  # rank-stabilised scaling
    lo.rank_overrides = ml_collections.ConfigDict({t: config_dict.placeholder(int) for t in TARGETS})
    lo.alpha_overrides = ml_collections.ConfigDict({t: config_dict.placeholder(float) for t in TARGETS})

    config.data = d = ml_collections.ConfigDict()
    d.name = "cocohd"  # fincot | govreport | medmcqa | medreason | cocohd | llavacot | invoiceocr
    d.manual_dir = config_dict.placeholder(str)  # where the upstream files were downloaded (see each builder)
    d.data_dir = config_dict.placeholder(str)  # prepared tfds datasets; None = <workdir>/tfds
    d.tokenizer_dir = config_dict.placeholder(str)  # None = model.hf_dir
    d.max_seq_len = 32768  # packed row length in tokens
    d.max_target_tokens = 2048  # longer targets are dropped and counted
    d.truncation = "document_end"  # "document_end" | "document_middle": only the document is ever cut
    d.pack = True  # pack several examples per row (segment_ids keep them apart)
    d.reasoning_traces = False  # put reasoning traces (if the dataset has them) before the answer
    # Qwen3's chat template switch: None = the template's default (thinking: an assistant turn opens with a
    # <think> block, empty without a trace); False = the non-thinking prompt (an empty block already in it).
    d.enable_thinking = config_dict.placeholder(bool)
    d.render_date = "2024-07-26"  # "today" for chat templates that print a date (Llama 3.x): pinned, never the clock
    d.use_bundled_samples = False  # the tiny samples written by data/samples.py (runlocal)
    d.bad_images = "error"  # an undecodable image file: "error" (stop, naming it) | "drop" (drop and count)

    # data.name="planted": the teacher is the base + a low-rank delta planted on `targets`; its greedy
    # continuations of random prompts are the dataset (lora_jax/run/planted.py writes them to
    # <workdir>/planted unless data.manual_dir is set). The study must find P = targets on its own.
    config.planted = p = ml_collections.ConfigDict()
    p.targets = ("o_proj",)  # the module set P carrying the planted delta (any of qkv, o_proj, fc1, fc2)
    p.rank = 4  # rank of the planted delta, per layer and module
    p.relative_norm = 0.5  # ||delta W||_F / ||W||_F of each planted layer's kernel
    p.layers = ()  # decoder layers planted; () = all
    p.seed = 0  # the delta's and the prompts' draws
    p.num_train, p.num_test = 512, 64  # prompts continued by the teacher, per split
    p.prompt_tokens = 16  # random prompt ids (any id but the end-of-turn)
    p.new_tokens = 32  # the teacher's greedy continuation budget (it may stop earlier at its end-of-turn)

    config.optim = o = ml_collections.ConfigDict()
    o.learning_rate = 2e-4  # peak learning rate (AdamW)
    o.warmup_steps = 50  # linear warmup, then cosine decay to 0 at train.total_steps
    o.weight_decay = 0.0  # AdamW decoupled weight decay on LoRA weights
    o.grad_clip_norm = 1.0  # global-norm clipping (0 = off)
    o.grad_accum_steps = 1  # micro-batches summed inside one jitted step
    # Learning-rate multipliers (lora_jax/train/step.py LrScale): per target, on both A and B; and LoRA+
    # (Hayou et al. 2024; PEFT's create_loraplus_optimizer): B's learning rate = loraplus_ratio x A's. 1 = off.
    o.lr_per_target = ml_collections.ConfigDict({t: 1.0 for t in TARGETS})
    o.loraplus_ratio = 1.0

    config.train = t = ml_collections.ConfigDict()
    t.total_steps = 1000  # optimizer updates
    t.global_batch_size = 8  # packed rows per update, over all processes
    t.seed = 0  # data order, LoRA init and dropout
    t.log_every_steps = 10  # metrics to TensorBoard (and the NaN check)
    t.checkpoint_every_steps = 200  # periodic orbax checkpoints (also one at the end)
    t.max_to_keep = 3  # checkpoints kept
    t.loss_chunk_tokens = 512  # sequence chunk of the cross-entropy (never the full [B, T, vocab] logits)
    t.allow_changed_on_resume = ()  # keys (e.g. "train.total_steps") a resumed run may change on purpose
    # Successive halving over a joint run's arms (lora_jax/run/halving.py): at each rung (a fraction of
    # total_steps) the live arms are ranked on `metric` and the best 1/eta go on; () = off.
    t.halving = ml_collections.ConfigDict(
        dict(
            rungs=(),  # e.g. (0.2, 0.4): with 9 arms and eta 3, 9 arms train to 20%, 3 to 40%, 1 to the end
            eta=3,
            metric="loss",  # "loss": held-out token loss | "score": the dataset's suite metric
            proxy_batches=4,  # step-0 gradient-norm proxy over this many batches (0 = none); halving runs only
        )
    )
    # Divergence stops the run (one error line, exit 2, no adapter; summary.json says "diverged"), checked at
    # every log and checkpoint step; lora_jax/train/divergence.py explains the rules. 0 turns a rule off.
    t.divergence = ml_collections.ConfigDict(
        dict(
            max_norm_growth=20.0,  # stop when ||LoRA weights|| > this x their norm at initialisation
            max_loss_rise=1.0,  # stop when the loss stays this many nats above its lowest logged value ...
            patience=3,  # ... at this many consecutive checks
        )
    )

    config.eval = e = ml_collections.ConfigDict()
    e.evaluators = ("loss", "generate", "latency")  # what runs (eval/evaluators.py): test loss, the suite, TTFT/TPOT
    e.eval_every_steps = 0  # evaluators every N steps during training (0 = only at the end)
    e.max_eval_batches = 0  # loss evaluator: 0 = the whole split
    e.batch_size = 8  # loss evaluator: rows per batch
    e.adapter_dir = config_dict.placeholder(str)  # mode=eval: a PEFT adapter dir to score (else --workdir's)
    e.samples_to_log = 4  # generations written to TensorBoard as text
    e.latency = ml_collections.ConfigDict(
        dict(
            batch_size=1,  # prompts per request (the study's serving latency: one request at a time)
            prompt_tokens=128,  # random prompt ids (latency does not depend on their values)
            new_tokens=64,  # TPOT is over these
            requests=20,  # timed requests per variant (base, unmerged, merged), interleaved
            warmup=2,  # untimed requests first, >= 1 (compilation must not land in TTFT/TPOT)
            mesh="auto",  # decode mesh: "auto" (1 device if it fits, else kv-head tensor-parallel) | "single" | "tensor[:N]"
        )
    )
    e.suites = ml_collections.ConfigDict()  # one per dataset; the run scores suites[data.name]
    for name, (metric, max_new, n) in SUITES.items():
        e.suites[name] = ml_collections.ConfigDict(
            dict(
                split="test",  # the split scored
                metric=metric,  # eval/metrics.py METRICS
                num_examples=n,  # the split's first N examples (0 = all)
                max_new_tokens=max_new,  # generation budget (prompts are cut so that prompt + this fit)
                stop=(),  # stop strings; end-of-turn and EOS ids always stop
                batch_size=8,  # prompts decoded together
                prefill_chunk=2048 if name in ("govreport", "cocohd") else 0,  # 0 = whole prompt at once
                temperature=0.0,  # 0 = greedy, as the study scores
                # the reply is the model's next-token argmax at each reference position, given the reference
                # so far (eval/suites.py): the planted teacher's agreement, not a free generation
                teacher_forced=name == "planted",
            )
        )

    config.mesh = ms = ml_collections.ConfigDict()
    ms.shape = (1, -1, 1)  # (data, fsdp, tensor); -1 = the remaining devices

    if arg == "runlocal":
        apply_runlocal(config)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; valid: 'runlocal'")
    # Locked: the keys above are the schema. Setting any other key (in an arm file, or by a
    # --config.<key>= flag) fails at the assignment, naming the key.
    return config.lock()


def apply_runlocal_vision(config: ml_collections.ConfigDict) -> None:
    """A tiny random SigLIP tower (32x32 pixels, 16 patches) for the image datasets' runlocal runs."""
    v = config.model.vision
    v.hidden_size, v.intermediate_size, v.num_layers, v.num_heads, v.image_size, v.patch_size = 32, 64, 2, 4, 32, 8
    v.image_token_id = 259  # the bundled tiny tokenizer's <image> (written for image datasets)
    config.model.vocab_size = 260


def apply_runlocal(config: ml_collections.ConfigDict) -> None:
    """Tiny random model, bundled samples, a few steps: about a minute on a laptop CPU."""
    m = config.model
    m.hf_dir = None
    m.vocab_size, m.hidden_size, m.intermediate_size = 259, 64, 128
    m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 2, 4, 2, 16
    m.max_position_embeddings = 2048
    m.param_dtype, m.compute_dtype, m.remat = "float32", "float32", "none"
    config.lora.rank, config.lora.alpha = 8, 16.0
    config.lora.dropout = 0.05  # exercised on purpose: a resumed run must repeat the same masks
    config.data.use_bundled_samples = True
    config.data.max_seq_len, config.data.max_target_tokens = 1024, 768
    config.optim.learning_rate, config.optim.warmup_steps = 2e-2, 2
    t = config.train
    t.total_steps, t.global_batch_size, t.log_every_steps, t.checkpoint_every_steps = 20, 4, 2, 10
    config.eval.batch_size, config.eval.max_eval_batches = 4, 2
    for suite in config.eval.suites.values():  # a few short generations: the path runs, in seconds
        suite.num_examples, suite.max_new_tokens, suite.batch_size, suite.prefill_chunk = 4, 16, 4, 0
    lat = config.eval.latency
    lat.prompt_tokens, lat.new_tokens, lat.requests, lat.warmup = 32, 8, 3, 1
    config.mesh.shape = (1, 1, -1)  # any device count: the 4-row batch is never split, the model is


def apply_runlocal_planted(config: ml_collections.ConfigDict) -> None:
    """The planted study on the tiny random model: its own short rows, every test prompt scored with
    the teacher's whole continuation budget, and enough steps to learn the teacher."""
    # A confident base: at std 0.02 the tiny model's next-token distributions are nearly flat, so its
    # greedy tokens (and the teacher's) are decided by noise no arm can learn; at 0.3 they are peaked.
    config.model.initializer_range = 0.3
    config.data.max_seq_len, config.data.max_target_tokens = MAX_SEQ_LEN["planted"], MAX_TARGET_TOKENS["planted"]
    suite = config.eval.suites.planted
    suite.num_examples, suite.max_new_tokens, suite.batch_size = 0, config.planted.new_tokens, 64
    config.eval.batch_size, config.eval.max_eval_batches = 16, 0
    t = config.train
    t.total_steps, t.global_batch_size, t.log_every_steps, t.checkpoint_every_steps = 150, 16, 25, 150
    config.optim.learning_rate, config.optim.warmup_steps = 1e-2, 10


def arm_config(dataset: str, arm: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one study arm: dataset defaults + the arm's targets (+ runlocal); locked, as
    get_config's."""
    config = get_config(None)
    config.arm = arm
    config.lora.targets = ARMS[arm]
    config.data.name = dataset
    config.data.max_seq_len = MAX_SEQ_LEN[dataset]
    config.data.max_target_tokens = MAX_TARGET_TOKENS[dataset]
    config.data.reasoning_traces = dataset in ("fincot", "medreason")
    if dataset in IMAGE_DATASETS:
        config.data.pack = False  # one example (and its image) per row
    if arg == "runlocal":
        apply_runlocal(config)
        if dataset in IMAGE_DATASETS:
            apply_runlocal_vision(config)
        if dataset == "planted":
            apply_runlocal_planted(config)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; valid: 'runlocal'")
    return config
