"""main.py as a user runs it: the runlocal arm, the real Hugging Face path, kill -9 and resume."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.cli import ENV, ROOT, main_cmd, reference_copy, run_main


def read_adapter(workdir):
    from safetensors.numpy import load_file

    return load_file(str(workdir / "adapter" / "adapter_model.safetensors"))


def test_runlocal_arm_writes_events_checkpoints_and_adapter(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    workdir, summary = reference_run
    losses = [loss for _, loss in summary["train_loss_history"]]
    assert losses[-1] < losses[0] - 0.1  # loss falls
    ea = EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    ea.Reload()
    tags = set(ea.Tags()["tensors"])
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "trainable_params", "eval_loss"} <= tags
    assert {"real_tokens_per_s", "target_tokens_per_s"} <= tags
    tb_loss = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in ea.Tensors("loss")}
    assert tb_loss[20] == pytest.approx(losses[-1], rel=1e-6)
    mfu = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in ea.Tensors("mfu")]
    assert all(0 < m <= 1 for m in mfu)
    speed_tags = ("tokens_per_s", "real_tokens_per_s", "target_tokens_per_s")
    speeds = {tag: [float(tensor_util.make_ndarray(e.tensor_proto)) for e in ea.Tensors(tag)] for tag in speed_tags}
    padded, real, target = speeds["tokens_per_s"], speeds["real_tokens_per_s"], speeds["target_tokens_per_s"]
    assert all(0 < tg < r <= p * (1 + 1e-6) for p, r, tg in zip(padded, real, target))  # no padding, no prompts
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]
    cfg = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["o_proj", "down_proj"] and cfg["r"] == 8
    assert any(np.abs(v).max() > 0 for k, v in read_adapter(workdir).items() if "lora_B" in k)


def test_kill_and_resume_equals_uninterrupted(reference_run, tmp_path):
    """SIGKILL once the checkpoint of a seeded step exists, then the same command again (dropout > 0)."""
    ref_dir, _ = reference_run
    every = "--config.train.checkpoint_every_steps=5"  # checkpoints at 5, 10, 15, 20
    kill_after = int(np.random.default_rng(7).choice([5, 10, 15]))
    proc = subprocess.Popen(
        main_cmd(tmp_path, every), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / str(kill_after)).exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the checkpoint to kill at"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    summary = run_main(tmp_path, every)
    assert summary["resumed_from"] >= kill_after
    ours, ref = read_adapter(tmp_path), read_adapter(ref_dir)
    assert ours.keys() == ref.keys()
    assert max(float(np.abs(ours[k] - ref[k]).max()) for k in ref) <= 1e-6


def snapshot(directory):
    """Every file under a directory with its size and modification time."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.relpath(os.path.join(root, f), directory)] = (st.st_size, st.st_mtime_ns)
    return out


def test_workdir_of_another_arm_is_refused(reference_run, tmp_path):
    workdir = reference_copy(reference_run, tmp_path / "run")  # main.py probes the workdir: not the shared one
    before = snapshot(workdir)
    proc = subprocess.run(
        main_cmd(workdir, config="configs/cocohd_qkv.py:runlocal"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "holds a checkpoint of another run (arm='oproj_fc2'" in proc.stderr
    assert snapshot(workdir) == before  # refused before anything was written


def test_unknown_override_key_is_refused(tmp_path):
    proc = subprocess.run(
        main_cmd(tmp_path, "--config.optim.learning_rat=0.1"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "learning_rat" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_real_hf_checkpoint_path_matches_peft(tmp_path):
    """A tiny transformers Qwen2 + tokenizer + chat template on disk, 2 steps, then PEFT on transformers."""
    import torch
    import transformers

    from data import samples

    hf_dir = tmp_path / "qwen2"
    config = transformers.Qwen2Config(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(hf_dir)
    samples.write_tiny_tokenizer(hf_dir)
    workdir = tmp_path / "work"
    run_main(
        workdir,
        f"--config.model.hf_dir={hf_dir}",
        "--config.train.total_steps=2",
        "--config.train.checkpoint_every_steps=2",
        config="configs/medmcqa_qkv_fc2.py:runlocal",
    )
    adapter = workdir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf_dir)

    import jax
    import jax.numpy as jnp

    from lora_jax.io.hf_checkpoint import load_hf_model
    from lora_jax.io.peft_adapter import read_peft_adapter, set_lora_weights
    from lora_jax.model.transformer import RuntimeOptions
    from lora_jax.sharding import make_mesh

    tokens = np.random.default_rng(0).integers(0, 259, size=(2, 24))
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    base = load_hf_model(str(hf_dir), None, RuntimeOptions(), mesh)
    spec, weights = read_peft_adapter(str(adapter), base.config)
    model = load_hf_model(str(hf_dir), spec, RuntimeOptions(), mesh)
    set_lora_weights(model, weights)
    ours = np.asarray(model(jnp.asarray(tokens)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    import peft

    with torch.no_grad():
        plain = hf(torch.as_tensor(tokens)).logits.numpy()  # before PEFT injects into hf in place
        ref = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(ref - plain).max() > 1e-4  # two steps really moved the adapter
    np.testing.assert_allclose(ours, ref, atol=1e-4)
