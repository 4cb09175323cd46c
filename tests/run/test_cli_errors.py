"""Bad input as a user gives it to main.py: every case exits with status 2 and one line on stderr that
names the culprit, prints no traceback, and leaves an existing workdir's checkpoints byte-identical.

The cases run as real subprocesses, three at a time (most fail within a few seconds of start-up)."""

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from lora_jax.io.peft_adapter import BASE_FILE
from tests.cli import ARM, ENV, ROOT, file_hashes, reference_copy
from tests.hf_reference import peft_fc2_adapter, write_llama_dir


def _tiny_hf_dir(d, truncate=False):
    """A 1-layer Llama checkpoint of zeros (the dimensions in TINY_HF_DIMS); optionally truncated."""
    return write_llama_dir(
        d, vocab=259, hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1, head_dim=8, truncate=truncate
    )


def _cocohd_dir(d, lines):
    d.mkdir()
    (d / "cocohd.jsonl").write_text("\n".join(lines) + "\n")
    return d


def _foreign_adapter(t, W):
    """The shared run's adapter, its lora_jax_base.json saying it was trained on another base."""
    shutil.copytree(W / "adapter", t / "adapter")
    (t / "adapter" / BASE_FILE).write_text(json.dumps({"base_model": "random-0000000000000000"}))
    return t / "adapter"


def _weightless_adapter(t):
    """A PEFT adapter directory with its adapter_config.json but no adapter_model.safetensors."""
    (t / "adapter").mkdir()
    (t / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    return t / "adapter"


# The runlocal model's dimensions overridden to _tiny_hf_dir's, so that the checkpoint's own defect is what is refused.
TINY_HF_DIMS = [
    f"--config.model.{k}={v}"
    for k, v in dict(
        hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8
    ).items()
]


def _config_file(d, body):
    """A config file in `d` whose get_config() runs `body` (lines, indented by 4)."""
    d.mkdir(exist_ok=True)
    path = d / "my_arm.py"
    path.write_text(
        "import ml_collections\n\nfrom configs import base\n\n\ndef get_config(arg=None):\n"
        + "".join(f"    {line}\n" for line in body)
    )
    return path


def _arm_with_unknown_key(d):
    """An arm file built on configs/base.py that sets a key the schema lacks (line 8 of the file)."""
    lines = ['config = base.arm_config("cocohd", "oproj_fc2", arg)', "config.optim.learning_rat = 0.1", "return config"]
    return _config_file(d, lines)


def _config_not_from_base(d):
    """A config file that builds its own ConfigDict with a few of the schema's keys."""
    return _config_file(d, ["return ml_collections.ConfigDict(dict(mode='train', arms=()))"])


def _parquet_govreport(d):
    d.mkdir()
    (d / "train.parquet").write_bytes(b"PAR1 this is not parquet")
    (d / "validation.jsonl").write_text('{"input": "a", "output": "b"}\n')
    return d


# (name, how the command is built, what the one stderr line must contain).
# "W" is an existing workdir with checkpoints (the shared runlocal run); "fresh" a new one.
CASES = [
    ("no config", lambda t, W: ["--workdir=" + str(W)], "--config is required"),
    ("missing config file", lambda t, W: ["--config=configs/nope.py", f"--workdir={W}"], "no such config file"),
    ("bad config argument", lambda t, W: ["--config=configs/cocohd_oproj_fc2.py:runloca"], "runloca"),
    ("unknown key", lambda t, W: ["--config.optim.learning_rat=1"], "did you mean learning_rate"),
    ("unknown section", lambda t, W: ["--config.bogus=1"], "--config.bogus"),
    (
        "unknown key in an arm file",
        lambda t, W: [f"--config={_arm_with_unknown_key(t)}:runlocal", _fresh(t)],
        "my_arm.py:8: config.optim.learning_rat = 0.1: unknown config key learning_rat; did you mean learning_rate? "
        "(configs/base.py lists every config key)",
    ),
    (
        "config not built on configs/base.py",
        lambda t, W: [f"--config={_config_not_from_base(t)}", _fresh(t)],
        "the config lacks arm, data.bad_images",
    ),
    ("lora layer past the model", lambda t, W: ["--config.lora.layers=(5,)", _fresh(t)], "lora.layers=(5,): the model"),
    ("not an int", lambda t, W: ["--config.train.total_steps=abc"], "total_steps"),
    ("positional argument", lambda t, W: ["extra"], "unexpected arguments extra"),
    (
        "no example fits the rows",
        lambda t, W: ["--config.data.max_seq_len=256", "--config.data.max_target_tokens=64", _fresh(t)],
        "no example fits data.max_seq_len=256",
    ),
    ("mesh too big", lambda t, W: ["--config.mesh.shape=(3,1,1)"], "mesh.shape (3, 1, 1)"),
    ("hf_dir missing", lambda t, W: ["--config.model.hf_dir=/no/such/model"], "/no/such/model"),
    ("hf_dir no config", lambda t, W: [f"--config.model.hf_dir={t}"], "has no config.json"),
    (
        "truncated safetensors",
        lambda t, W: [f"--config.model.hf_dir={_tiny_hf_dir(t / 'hf', truncate=True)}", *TINY_HF_DIMS],
        "model.safetensors: unreadable safetensors file",
    ),
    (
        "hf_dir conflicts with the model's dimensions",
        lambda t, W: [f"--config.model.hf_dir={_tiny_hf_dir(t / 'hf')}", _fresh(t)],
        "model.hidden_size=64 conflicts with",
    ),
    ("tokenizer dir missing", lambda t, W: ["--config.data.tokenizer_dir=/no/tok"], "data.tokenizer_dir"),
    ("manual dir missing", lambda t, W: ["--config.data.use_bundled_samples=False"], "no such directory: None"),
    (
        "manual dir wrong",
        lambda t, W: ["--config.data.use_bundled_samples=False", f"--config.data.manual_dir={t}/nothing"],
        "nothing",
    ),
    (
        "malformed JSON line",
        lambda t, W: [
            "--config.data.use_bundled_samples=False",
            f"--config.data.manual_dir={_cocohd_dir(t / 'c', ['{oops'])}",
            f"--workdir={t / 'fresh'}",
        ],
        "cocohd.jsonl:1: malformed JSON line",
    ),
    (
        "unreadable parquet",
        lambda t, W: [
            "--config.data.name=govreport",
            "--config.data.use_bundled_samples=False",
            f"--config.data.manual_dir={_parquet_govreport(t / 'g')}",
            f"--workdir={t / 'fresh'}",
        ],
        "train.parquet: unreadable Parquet file",
    ),
    ("latency warmup 0", lambda t, W: ["--config.eval.latency.warmup=0", _fresh(t)], "eval.latency.warmup=0 must be"),
    (
        "latency past the context",
        lambda t, W: ["--config.eval.latency.prompt_tokens=4000", _fresh(t)],
        "eval.latency.prompt_tokens + new_tokens = 4008 passes the model's context (2048)",
    ),
    (
        "joint latency past the context",
        lambda t, W: ["--config.arms=('oproj','fc2')", "--config.eval.latency.new_tokens=4000", _fresh(t)],
        "eval.latency.prompt_tokens + new_tokens = 4032 passes the model's context (2048)",
    ),
    (
        "llava latency past the context",
        lambda t, W: [
            "--config=configs/llavacot_oproj.py:runlocal",
            "--config.eval.latency.prompt_tokens=2040",
            "--config.eval.latency.new_tokens=8",
            _fresh(t),
        ],
        "eval.latency.prompt_tokens + new_tokens + the image's tokens_per_image = 2040 + 8 + 16 = 2064 passes the "
        "model's context (2048)",
    ),
    (
        "feature layer past the tower",
        lambda t, W: [
            "--config=configs/llavacot_oproj.py:runlocal",
            "--config.model.vision.feature_layer=-5",
            _fresh(t),
        ],
        "model.vision.feature_layer=-5 must be an integer in [-3, 2]",
    ),
    (
        "study arm name on other targets",
        lambda t, W: ["--config.lora.targets=('fc2',)", _fresh(t)],
        "config.arm='oproj_fc2' is the study arm of targets ('o_proj', 'fc2'), but lora.targets=('fc2',)",
    ),
    (
        "adapter without weights",
        lambda t, W: ["--config.mode=eval", f"--config.eval.adapter_dir={_weightless_adapter(t)}", _fresh(t)],
        "adapter_model.safetensors: missing",
    ),
    (
        "adapter of another arm on a random base",
        lambda t, W: ["--config.mode=eval", f"--config.eval.adapter_dir={peft_fc2_adapter(t / 'fc2')}", _fresh(t)],
        "adapter on ('fc2',) does not fit the model",
    ),
    (
        "arms in mode=eval",
        lambda t, W: ["--config.arms=('oproj','fc2')", "--config.mode=eval", _fresh(t)],
        "config.arms trains arms jointly; mode=eval scores one arm",
    ),
    (
        "image dataset on a text config",
        lambda t, W: ["--config.data.name=invoiceocr", "--config.data.pack=False", _fresh(t)],
        "data.name='invoiceocr' is an image dataset and the model has no vision tower",
    ),
    (
        "adapter of another base",
        lambda t, W: ["--config.mode=eval", f"--config.eval.adapter_dir={_foreign_adapter(t, W)}", _fresh(t)],
        "adapter/lora_jax_base.json: the adapter was trained on base random-0000000000000000, but this run's base is random-",
    ),
    ("workdir under a file", lambda t, W: [f"--workdir={ROOT}/README.md/run"], "README.md/run is not writable"),
    (
        "workdir of another arm",
        lambda t, W: ["--config=configs/cocohd_qkv.py:runlocal"],
        "holds a checkpoint of another run (arm='oproj_fc2'",
    ),
    ("schedule changed on resume", lambda t, W: ["--config.train.total_steps=40"], "train.total_steps=20"),
    (
        "data and accumulation changed on resume",
        lambda t, W: ["--config.data.max_seq_len=900", "--config.optim.grad_accum_steps=2"],
        "data.max_seq_len=1024, this run has 900; optim.grad_accum_steps=1, this run has 2",
    ),
]


# Bad values refused by the config check (lora_jax.run.config.validate, which main.py runs before
# anything else): parsed in-process by main.py's own flag definition (a fresh absl FlagValues per case),
# as main.py would parse them; the cases above run main.py itself for how a ConfigError reaches the user
# (one line, exit 2, nothing written), so each of these need not start a Python of its own.
CONFIG_CASES = [
    ("unknown target", ["--config.lora.targets=('o_proj','mlp')"], "unknown LoRA target"),
    ("rank 0", ["--config.lora.rank=0"], "lora.rank=0"),
    ("dropout 1.5", ["--config.lora.dropout=1.5"], "lora.dropout=1.5"),
    ("checkpoint every 0", ["--config.train.checkpoint_every_steps=0"], "checkpoint_every_steps=0"),
    ("log every 0", ["--config.train.log_every_steps=0"], "log_every_steps=0"),
    ("total steps 0", ["--config.train.total_steps=0"], "total_steps=0"),
    ("negative lr", ["--config.optim.learning_rate=-1.0"], "learning_rate=-1.0"),
    ("accumulation 0", ["--config.optim.grad_accum_steps=0"], "grad_accum_steps=0"),
    ("accumulation 3 of 4", ["--config.optim.grad_accum_steps=3"], "global_batch_size=4"),
    ("eval batch 0", ["--config.eval.batch_size=0"], "eval.batch_size=0"),
    ("unknown dataset", ["--config.data.name=squad"], "data.name='squad'"),
    ("unknown truncation", ["--config.data.truncation=middle"], "data.truncation='middle'"),
    ("image dataset", ["--config.data.name=llavacot"], "data.pack=True with data.name='llavacot'"),
    ("bad image policy", ["--config.data.bad_images=skip"], "data.bad_images='skip'"),
    ("seq len 4", ["--config.data.max_seq_len=4"], "max_seq_len=4"),
    ("target > seq", ["--config.data.max_target_tokens=4096"], "max_target_tokens=4096"),
    ("mesh of 2", ["--config.mesh.shape=(1,2)"], "mesh.shape"),
    ("unknown dtype", ["--config.model.param_dtype=float16"], "model.param_dtype='float16'"),
    ("unknown attention", ["--config.model.attention_impl=flash"], "attention_impl='flash'"),
    ("unknown remat", ["--config.model.remat=some"], "model.remat='some'"),
    ("zero layers", ["--config.model.num_layers=0"], "model.num_layers=0"),
    ("bad resume key", ["--config.train.allow_changed_on_resume=('lora.rank',)"], "lora.rank"),
]


# Cases refused by a check of the config (or of a file it names): their fresh workdir is not even created (no tfds/, bundled/, checkpoints/).
NOTHING_WRITTEN = (
    "latency warmup 0",
    "latency past the context",
    "joint latency past the context",
    "llava latency past the context",
    "hf_dir conflicts with the model's dimensions",
    "feature layer past the tower",
    "study arm name on other targets",
    "adapter without weights",
    "adapter of another arm on a random base",
    "arms in mode=eval",
    "image dataset on a text config",
    "adapter of another base",
    "unknown key in an arm file",
    "config not built on configs/base.py",
    "lora layer past the model",
)


def _fresh(t):
    return f"--workdir={t / 'fresh'}"


def _command(args, workdir):
    """main.py with the case's arguments; the runlocal arm and the shared workdir unless the case names its own."""
    given = lambda flag: any(a.startswith(flag + "=") for a in args)  # noqa: E731
    defaults = [] if given("--config") else [f"--config={os.path.join(ROOT, ARM)}"]
    defaults += [] if given("--workdir") else [f"--workdir={workdir}"]
    return [sys.executable, os.path.join(ROOT, "main.py"), *defaults, *args]


@pytest.fixture(scope="module")
def results(reference_run, tmp_path_factory):
    """Runs every case against the shared workdir; returns ({name: CompletedProcess}, hashes before, the
    shared workdir, {name: the case's own directory})."""
    workdir = reference_copy(reference_run, tmp_path_factory.mktemp("shared") / "run")  # the cases write probes
    before = file_hashes(workdir / "checkpoints")
    commands, case_dirs = {}, {}
    for name, build, _ in CASES:
        case_dir = case_dirs[name] = tmp_path_factory.mktemp("case")
        args = build(case_dir, workdir)
        no_config = name == "no config"
        commands[name] = (
            [sys.executable, os.path.join(ROOT, "main.py"), *args] if no_config else _command(args, workdir)
        )

    def run(cmd):
        return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        procs = dict(zip(commands, pool.map(run, commands.values())))
    return procs, before, workdir, case_dirs


def test_at_least_thirty_cases():
    assert len(CASES) + len(CONFIG_CASES) >= 30


@pytest.mark.parametrize("name,expected", [(n, e) for n, _, e in CASES], ids=[n for n, _, _ in CASES])
def test_bad_input_is_one_line_exit_2(results, name, expected):
    proc = results[0][name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


def test_existing_checkpoints_are_untouched(results):
    _, before, workdir, _ = results
    assert file_hashes(workdir / "checkpoints") == before


@pytest.mark.parametrize("name", NOTHING_WRITTEN)
def test_a_config_check_refuses_before_the_workdir_is_written(results, name):
    procs, _, _, case_dirs = results
    assert procs[name].returncode == 2, procs[name].stderr[-2000:]
    fresh = case_dirs[name] / "fresh"
    assert not fresh.exists(), sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*"))[:20]


# Lines that TensorFlow, XLA, absl's C++ logging or CUDA print, which a user must never see from main.py.
LIBRARY_LINE = re.compile(r"oneDNN|absl::InitializeLog|cuda|TF_ENABLE|^[IWE]0000|cpu_feature_guard|rebuild TensorFlow")


def test_every_case_prints_only_our_lines(results):
    """Every case's stdout and stderr (start-up, config loading, data preparation, restore) hold none
    of the libraries' native start-up or log lines."""
    procs = results[0]
    leaked = {
        n: line for n, p in procs.items() for line in (p.stdout + p.stderr).splitlines() if LIBRARY_LINE.search(line)
    }
    assert not leaked, leaked


def test_main_quiets_native_logs_before_tensorflow_loads():
    """Importing main.py sets TF_CPP_MIN_LOG_LEVEL=3 (read by TensorFlow and XLA when they load) before
    anything has imported TensorFlow or jax; --verbose leaves it unset, and a user's own value is kept."""
    code = (
        "import os, sys; os.environ.pop('TF_CPP_MIN_LOG_LEVEL', None); sys.argv = ['main.py'];"
        "import main; quiet = os.environ.pop('TF_CPP_MIN_LOG_LEVEL', None);"
        "loaded = [m for m in ('tensorflow', 'jax', 'clu') if m in sys.modules];"
        "main.quiet_native_logs(['main.py', '--verbose']); verbose = os.environ.get('TF_CPP_MIN_LOG_LEVEL');"
        "os.environ['TF_CPP_MIN_LOG_LEVEL'] = '1'; main.quiet_native_logs(['main.py']);"
        "print(quiet, loaded, verbose, os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["3", "[]", "None", "1"], proc.stdout


def test_model_bounds_are_checked_with_the_config():
    """lora.layers past the model's layers, a training row past its context, and a negative
    eval.samples_to_log are refused by validate (before anything is written), naming the key."""
    from configs import base
    from lora_jax.errors import ConfigError
    from lora_jax.run.config import validate

    for key, value, message in [
        ("lora.layers", (2,), r"lora\.layers=\(2,\): the model has layers 0\.\.1"),
        (
            "data.max_seq_len",
            4096,
            r"data\.max_seq_len=4096 passes the model's context \(max_position_embeddings=2048\)",
        ),
        ("eval.samples_to_log", -1, r"eval\.samples_to_log=-1 must be >= 0"),
    ]:
        config = base.arm_config("cocohd", "oproj_fc2", "runlocal")
        section, name = key.split(".")
        config[section][name] = value
        with pytest.raises(ConfigError, match=message):
            validate(config)
    validate(base.arm_config("cocohd", "oproj_fc2", "runlocal"))  # the runlocal arm as shipped passes


def _parsed_config(args):
    """The runlocal arm with the case's --config.<key>= flags, parsed as main.py parses them."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["main.py", f"--config={os.path.join(ROOT, ARM)}", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


@pytest.mark.parametrize("args,expected", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_a_bad_config_value_is_refused_by_the_config_check(args, expected):
    from lora_jax.errors import ConfigError
    from lora_jax.run.config import validate

    config = _parsed_config(args)
    with pytest.raises(ConfigError) as refused:
        validate(config)
    line = " ".join(str(refused.value).split())  # as main.py prints it
    assert expected in line, line
