"""The resume identity covers the tokenizer and chat template, the base's dtypes and LLaVA's image
processor (by file contents, not paths), and a checkpoint written before those keys existed still
resumes. Each test saves a tiny checkpoint through the same CheckpointStore training uses."""

import json
import shutil

import jax.numpy as jnp
import pytest

from configs import base
from data import samples
from lora_jax.io.checkpoints import CheckpointStore, WorkdirMismatchError
from lora_jax.run.assemble import open_checkpoint_store, run_identity

FINGERPRINT = "0123456789abcdef"  # an HF checkpoint's fingerprint (its value is not what is tested)


def _hf_config(tmp_path, dataset="cocohd"):
    """A runlocal arm over a Hugging Face directory (config.json + the tiny tokenizer's files)."""
    hf = tmp_path / "hf"
    samples.write_tiny_tokenizer(hf)
    (hf / "config.json").write_text(json.dumps({"model_type": "llava" if dataset == "llavacot" else "llama"}))
    config = base.arm_config(dataset, "oproj", "runlocal")
    config.model.hf_dir = str(hf)
    config.model.param_dtype, config.model.compute_dtype = "bfloat16", "bfloat16"
    return config, hf


def _save_step(store) -> None:
    store.save(1, {"a": jnp.zeros(2)}, {"m": jnp.zeros(2)}, {}, {})
    store.wait()


def _refused(config, workdir) -> WorkdirMismatchError:
    with pytest.raises(WorkdirMismatchError) as e:
        open_checkpoint_store(config, workdir, FINGERPRINT)
    return e.value


def test_changed_tokenizer_files_refuse_the_resume_and_a_moved_copy_resumes(tmp_path):
    config, hf = _hf_config(tmp_path)
    workdir = tmp_path / "run"
    _save_step(open_checkpoint_store(config, workdir, FINGERPRINT))

    moved = tmp_path / "moved"  # the same files elsewhere: the same tokenizer
    shutil.copytree(hf, moved)
    config.data.tokenizer_dir = str(moved)
    assert open_checkpoint_store(config, workdir, FINGERPRINT).latest_step() == 1

    tok_config = json.loads((moved / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = tok_config["chat_template"].replace("<|im_start|>", "<|im_start|> ")
    (moved / "tokenizer_config.json").write_text(json.dumps(tok_config))  # same path, other template
    error = _refused(config, workdir)
    assert error.keys == ("tokenizer",)
    assert "tokenizer=" in str(error) and str(moved) in str(error)


@pytest.mark.parametrize("key", ["param_dtype", "compute_dtype"])
def test_changed_dtype_of_a_hugging_face_base_refuses_the_resume(tmp_path, key):
    config, _ = _hf_config(tmp_path)
    workdir = tmp_path / "run"
    _save_step(open_checkpoint_store(config, workdir, FINGERPRINT))
    config.model[key] = "float32"
    error = _refused(config, workdir)
    assert error.keys == (f"model.{key}",)
    assert f"model.{key}='bfloat16', this run has 'float32'" in str(error)


def test_changed_llava_preprocessor_config_refuses_the_resume(tmp_path):
    config, hf = _hf_config(tmp_path, dataset="llavacot")
    (hf / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 384, "width": 384}}))
    workdir = tmp_path / "run"
    _save_step(open_checkpoint_store(config, workdir, FINGERPRINT))
    (hf / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 336, "width": 336}}))
    error = _refused(config, workdir)
    assert error.keys == ("image_processor",) and "preprocessor_config.json changed" in str(error)


def test_a_checkpoint_without_the_new_keys_resumes_and_the_next_save_records_them(tmp_path):
    config, hf = _hf_config(tmp_path, dataset="llavacot")
    (hf / "preprocessor_config.json").write_text("{}")
    new_keys = ("tokenizer", "model.param_dtype", "model.compute_dtype", "image_processor")
    identity = run_identity(config, FINGERPRINT, "bundled:llavacot")
    assert set(new_keys) <= set(identity)
    workdir = tmp_path / "run"
    old = {k: v for k, v in identity.items() if k not in new_keys}  # what a checkpoint written before holds
    _save_step(CheckpointStore(str(workdir), 3, old))

    store = open_checkpoint_store(config, workdir, FINGERPRINT)
    assert store.latest_step() == 1
    store.save(2, {"a": jnp.zeros(2)}, {"m": jnp.zeros(2)}, {}, {})
    store.wait()
    _, _, _, meta = store.restore(2, {"a": jnp.zeros(2)}, {"m": jnp.zeros(2)})
    assert {k: meta[k] for k in new_keys} == {k: identity[k] for k in new_keys}


def test_a_random_base_fingerprint_names_how_its_weights_are_drawn(monkeypatch):
    """Workdirs and adapters of a random base drawn by another rule (e.g. before model/init.py drew
    on the host) must not resume or load silently on this one."""
    from lora_jax.model import init as initial
    from lora_jax.run.assemble import base_fingerprint

    config = base.arm_config("cocohd", "oproj", "runlocal")
    before = base_fingerprint(config)
    monkeypatch.setattr(initial, "DRAW_RULE", "jax-random-on-device")
    assert base_fingerprint(config) != before
