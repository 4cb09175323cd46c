"""mode=eval end to end (checkpoint, exported adapter, base model), greedy completions against a
transformers + PEFT model on the same adapter, and the suite's bad-input counts."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data import samples
from data.sft import SFTOptions
from data.tokenizer import Tokenizer
from eval.generation_suite import run_suite
from eval.suites import Suite
from lora_jax.lora.spec import LoraSpec
from lora_jax.model.transformer import RuntimeOptions, Transformer
from lora_jax.run.eval_hooks import completion_fn
from lora_jax.serve.generate import GenerationOptions, generate, left_pad
from lora_jax.sharding import make_mesh
from tests.cli import run_main_ok
from tests.hf_reference import peft_fc2_adapter, write_llama_dir
from tests.tiny_model import TINY


def _eval(workdir, *overrides):
    proc = run_main_ok(workdir, "--config.mode=eval", *overrides)
    return proc.stdout, json.loads((workdir / "eval" / "results.json").read_text())


def _suite_file(workdir):
    return json.loads((workdir / "eval" / "cocohd.json").read_text())


def _scalars(workdir):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    acc.Reload()
    return set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])


@pytest.mark.slow
def test_eval_mode_scores_the_checkpoint_the_adapter_and_the_base(reference_run, tmp_path):
    trained_dir, _ = reference_run
    trained = _suite_file(trained_dir)  # written by training's final evaluation
    assert trained["num_examples"] == 4 and len(trained["examples"]) == 4 and trained["step"] == 20
    assert trained["adapter"] == str(trained_dir / "adapter") and trained["adapter_source"] == "training"

    workdir = tmp_path / "copy"  # the shared run stays untouched
    shutil.copytree(trained_dir, workdir)
    out, results = _eval(workdir)
    from_ckpt = _suite_file(workdir)
    assert results["adapter"] == str(workdir / "checkpoints" / "20") and results["step"] == 20
    assert from_ckpt["adapter_source"] == "checkpoint" and from_ckpt["dataset"] == "cocohd"
    assert [r["prediction"] for r in from_ckpt["examples"]] == [r["prediction"] for r in trained["examples"]]
    assert from_ckpt["score"] == trained["score"] and "eval cocohd: json_key_value_match" in out
    assert {"eval/cocohd/json_key_value_match", "eval/cocohd/format_failures", "eval_loss"} <= _scalars(workdir)
    assert "eval/cocohd/samples" in _scalars(workdir)  # sample generations as TensorBoard text

    adapter_run = tmp_path / "adapter_run"
    _, results = _eval(adapter_run, f"--config.eval.adapter_dir={trained_dir / 'adapter'}")
    from_adapter = _suite_file(adapter_run)
    assert results["adapter"] == str(trained_dir / "adapter") and results["adapter_source"] == "peft"
    assert [r["prediction"] for r in from_adapter["examples"]] == [r["prediction"] for r in trained["examples"]]
    assert from_adapter["score"] == trained["score"]
    assert results["loss"]["eval_loss"] == pytest.approx(
        json.loads((trained_dir / "summary.json").read_text())["eval_loss"], rel=1e-5
    )

    base_run = tmp_path / "base_run"
    out, results = _eval(base_run)
    assert results["adapter"] is None and results["adapter_source"] == "base" and "scoring the base model alone" in out
    assert len(_suite_file(base_run)["examples"]) == 4 and not (base_run / "checkpoints").exists()
    trained_loss = json.loads((trained_dir / "summary.json").read_text())["eval_loss"]
    assert results["loss"]["eval_loss"] != pytest.approx(trained_loss, rel=1e-3)  # training changed the model


def test_greedy_completions_equal_transformers_peft(tmp_path):
    """The same adapter on the same prompts: our cached greedy decoding and PEFT's `generate` agree."""
    import peft
    import torch
    import transformers

    from lora_jax.io.hf_checkpoint import load_hf_model
    from lora_jax.io.peft_adapter import export_peft, load_hf_model_with_adapter
    from tests.hf_reference import saved_hf_dir

    d = saved_hf_dir("llama")
    mesh = make_mesh((1, 2, 4))
    ours = load_hf_model(d, LoraSpec(targets=("o_proj", "fc2"), rank=4, alpha=8), RuntimeOptions(), mesh)
    rng = np.random.default_rng(3)
    for t in ours.lora.targets:
        var = getattr(ours.layers, t).lora_b
        var.set_value(
            jax.device_put(
                jnp.asarray(rng.normal(size=var.get_value().shape) * 0.3, jnp.float32), var.get_value().sharding
            )
        )
    export_peft(ours, str(tmp_path / "adapter"), d)
    reloaded = load_hf_model_with_adapter(d, str(tmp_path / "adapter"), RuntimeOptions(), mesh)  # one call

    prompts = [[5, 9, 2, 33, 7, 1, 40, 12, 66], [11, 3, 90], [8, 8, 19, 22, 4]]
    tokens, mask = left_pad(prompts)
    n = 10
    out, _ = generate(reloaded, tokens, mask, GenerationOptions(max_new_tokens=n))

    hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").float().eval()
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )[:, tokens.shape[1] :].numpy()
    np.testing.assert_array_equal(out, ref)
    base = load_hf_model(d, LoraSpec(targets=("o_proj", "fc2"), rank=4, alpha=8), RuntimeOptions(), mesh)
    assert not np.array_equal(generate(base, tokens, mask, GenerationOptions(max_new_tokens=n))[0], out)


def test_suite_counts_bad_input_and_never_crashes(tmp_path):
    tok = Tokenizer(samples.write_tiny_tokenizer(tmp_path / "tok"))
    cfg = dataclasses.replace(TINY, vocab_size=259, max_position_embeddings=256)  # the tiny tokenizer's vocab
    model = Transformer(cfg, LoraSpec(targets=("o_proj",), rank=2, alpha=4), RuntimeOptions(), rngs=nnx.Rngs(0))
    ref = json.dumps({"title": "x"})
    records = [
        {"id": "ok", "instruction": "Summarize as JSON.", "document": "word " * 30, "target": ref, "answer": ref},
        {
            "id": "long-doc",
            "instruction": "Summarize as JSON.",
            "document": "word " * 2000,
            "target": ref,
            "answer": ref,
        },
        {"id": "too-long", "instruction": "x" * 600, "document": "", "target": ref, "answer": ref},
        {"id": "no-ref", "instruction": "Summarize as JSON.", "document": "", "target": "", "answer": ""},
    ]
    suite = Suite("cocohd", "test", "json_key_value_match", 0, 8, (), 2, 0, 0.0, 2)
    result = run_suite(records, suite, completion_fn(lambda: model, tok, SFTOptions(max_seq_len=512)))
    assert result["dropped_prompt_too_long"] == 1  # the instruction alone does not fit 256 - 8
    assert result["bad_references"] == 1 and result["num_examples"] == 2  # "ok" and the cut "long-doc"
    rows = {r["id"]: r for r in result["examples"]}
    assert rows["long-doc"]["prompt_tokens"] <= 256 - 8  # its document was cut as training cuts it
    assert result["format_failures"] == 2 and rows["ok"]["format_failure"] == "no parseable JSON"
    assert rows["no-ref"]["score"] is None and rows["no-ref"]["bad_reference"] == "empty reference"


def _runlocal_llama_dir(d):
    """A Llama checkpoint with the runlocal model's shapes (random weights) and the tiny tokenizer."""
    return write_llama_dir(
        d, vocab=259, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, seed=0
    )


def test_an_adapter_on_other_targets_is_filed_under_its_own_arm(tmp_path):
    """mode=eval of an fc2 adapter with the oproj_fc2 arm's config: results.json, the suite file and the
    report say fc2 (the adapter's targets), not config.arm."""
    from eval.report import read_run

    hf = _runlocal_llama_dir(tmp_path / "hf")
    adapter = peft_fc2_adapter(tmp_path / "adapter")
    workdir = tmp_path / "run"
    _, results = _eval(
        workdir,
        f"--config.model.hf_dir={hf}",
        f"--config.eval.adapter_dir={adapter}",
        "--config.eval.evaluators=('generate',)",
    )
    suite = _suite_file(workdir)
    assert results["arm"] == "fc2" and results.get("targets") == ["fc2"]
    assert (suite.get("arm"), suite.get("targets"), suite["adapter_source"]) == ("fc2", ["fc2"], "peft")
    runs, why = read_run(str(workdir))
    assert why is None and [r.arm for r in runs] == ["fc2"]


def test_training_and_mode_eval_give_a_checkpoint_one_arm_label():
    """Training labels its files with config.arm; mode=eval labels the model it scores by its targets
    (`labelled_config`). For every study arm the two agree, a config.arm outside the study's arms is
    kept by both, and a study arm name on other targets is refused by validate (one line naming both keys)."""
    from configs import base
    from lora_jax.errors import ConfigError
    from lora_jax.lora.arms import ARMS
    from lora_jax.run.config import lora_spec, random_model_config, runtime_options, validate
    from lora_jax.run.eval_mode import labelled_config

    def model_of(config):
        cfg, spec, opts = random_model_config(config), lora_spec(config), runtime_options(config)
        return nnx.eval_shape(lambda: Transformer(cfg, spec, opts, rngs=nnx.Rngs(0)))

    for arm in ARMS:
        config = base.arm_config("cocohd", arm, "runlocal")
        validate(config)
        assert labelled_config(config, model_of(config)).arm == arm
    config = base.arm_config("cocohd", "oproj_fc2", "runlocal")
    config.arm, config.lora.targets = "fc2_r8", ("fc2",)  # not a study arm's name: the config's own label
    validate(config)
    assert labelled_config(config, model_of(config)).arm == "fc2_r8"
    config.arm = "oproj_fc2"  # the study's oproj_fc2 is o_proj + fc2: this checkpoint would be filed twice
    with pytest.raises(ConfigError, match=r"^config\.arm='oproj_fc2' is the study arm .* lora\.targets=\('fc2',\)"):
        validate(config)
