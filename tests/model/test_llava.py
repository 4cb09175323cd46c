"""LLaVA: our vision tower + projector + decoder against transformers' LlavaForConditionalGeneration
(SigLIP + Qwen2, CLIP + Llama), our preprocessing against transformers' image processors on a real
image, and the clear errors (placeholders vs images, a checkpoint without a tower, a bad image)."""

import json
import os

import jax
import numpy as np
import pytest

from data.image_processing import ImageProcessor
from data.records import DataError
from lora_jax.errors import CheckpointError
from lora_jax.io.llava_checkpoint import load_llava
from lora_jax.model.transformer import RuntimeOptions
from lora_jax.sharding import make_mesh
from tests.fixtures import FIXTURES, needs_fixtures

IMAGE_TOKEN = 299


def tiny_llava_dir(tmp_path, kind):
    """A random tiny LLaVA saved by transformers: (torch model, directory)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    text.update(num_key_value_heads=2, max_position_embeddings=512)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=32, patch_size=8)
    if kind == "siglip":  # llava-interleave-qwen: SigLIP, the last layer, every position
        config = LlavaConfig(
            vision_config=SiglipVisionConfig(num_hidden_layers=2, **vision),
            text_config=Qwen2Config(**text),
            image_token_id=IMAGE_TOKEN,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    else:  # llava-1.5: CLIP, the second-to-last layer, without the class token
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(num_hidden_layers=3, **vision),
            text_config=LlamaConfig(**text),
            image_token_id=IMAGE_TOKEN,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # off the init values (zero biases, unit norms): every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    d = tmp_path / kind
    model.save_pretrained(str(d))
    return model, str(d)


def one_device():
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_logits_match_transformers_llava(tmp_path, kind):
    import torch

    hf, d = tiny_llava_dir(tmp_path, kind)
    ours = load_llava(d, None, RuntimeOptions(), one_device())
    n = ours.llava_config.tokens_per_image
    assert n == 16
    rng = np.random.default_rng(0)
    text = lambda k: list(rng.integers(1, 290, k))  # noqa: E731
    row0 = text(5) + [IMAGE_TOKEN] * n + text(n + 3)  # one image
    row1 = text(3) + [IMAGE_TOKEN] * n + text(4) + [IMAGE_TOKEN] * n + text(1)  # two images
    ids = np.array([row0, row1])
    pixels = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)  # torch layout, row-major over the batch
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    per_row = np.zeros((2, 2, 32, 32, 3), np.float32)  # ours: [batch, images per row, H, W, C]
    per_row[0, 0], per_row[1, 0], per_row[1, 1] = (p.transpose(1, 2, 0) for p in pixels)
    got = np.asarray(ours(ids, pixels=per_row))
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(ref).max() > 0.1


def test_greedy_decoding_with_images_is_transformers_token_for_token(tmp_path):
    """Rows of one and of two images, decoded greedily by transformers' `generate`, by our `generate`
    (stacked weights and cache under the layer scan) and by the timed Stepper (per-layer weights and
    caches, layers unrolled; its prefill runs the tower)."""
    import torch

    from lora_jax.serve.generate import GenerationOptions, Stepper, generate

    hf, d = tiny_llava_dir(tmp_path, "siglip")
    ours = load_llava(d, None, RuntimeOptions(), one_device())
    n, new = ours.llava_config.tokens_per_image, 8
    rng = np.random.default_rng(3)
    text = lambda k: list(rng.integers(1, 290, k))  # noqa: E731
    ids = np.array(
        [text(5) + [IMAGE_TOKEN] * n + text(n + 3), text(3) + [IMAGE_TOKEN] * n + text(4) + [IMAGE_TOKEN] * n + text(1)]
    )
    mask, opts = np.ones_like(ids), GenerationOptions(max_new_tokens=new)
    stepper = Stepper(ours, opts, 2, ids.shape[1])

    def decode(pixels):
        """pixels [3 images, 3, 32, 32] (torch layout, row-major over the batch) -> transformers' new
        ids, after checking that our generate and the Stepper decode the same."""
        with torch.no_grad():
            out = hf.generate(
                input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), max_new_tokens=new, do_sample=False
            )
        ref = out[:, ids.shape[1] :].numpy()
        per_row = np.zeros((2, 2, 32, 32, 3), np.float32)
        per_row[0, 0], per_row[1, 0], per_row[1, 1] = (p.transpose(1, 2, 0) for p in pixels)
        np.testing.assert_array_equal(np.asarray(generate(ours, ids, mask, opts, pixels=per_row)[0]), ref)
        steps = [np.asarray(stepper.prefill(ids, mask, pixels=per_row))]
        steps += [np.asarray(stepper.step()) for _ in range(new - 1)]
        np.testing.assert_array_equal(np.stack(steps, axis=1), ref)
        return ref

    pixels = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
    first = decode(pixels)
    pixels[2] = rng.normal(size=(3, 32, 32))  # row 1's second image, another
    second = decode(pixels)
    np.testing.assert_array_equal(second[0], first[0])  # row 0: the same prompt and image
    assert not np.array_equal(second[1], first[1])  # row 1 decodes from its images


@needs_fixtures
@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_preprocessing_matches_transformers_on_a_real_image(tmp_path, kind):
    from PIL import Image
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    settings = {  # the preprocessor_config.json of llava-interleave-qwen (SigLIP) and llava-1.5 (CLIP)
        "siglip": {
            "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
            "resample": 3,
            "size": {"height": 384, "width": 384},
        },
        "clip": {
            "crop_size": {"height": 336, "width": 336},
            "do_center_crop": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "size": {"shortest_edge": 336},
        },
    }[kind]
    settings.update(do_normalize=True, do_rescale=True, do_resize=True, rescale_factor=1 / 255)
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(settings))
    image = Image.open(os.path.join(FIXTURES, "llava_cot", "reasoning.png"))  # 878x651 RGBA
    assert image.mode == "RGBA"
    processor = (SiglipImageProcessorPil if kind == "siglip" else CLIPImageProcessorPil).from_pretrained(str(tmp_path))
    ref = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = ImageProcessor.from_config(str(path))(image)
    assert ours.shape == ref.shape == ((384, 384, 3) if kind == "siglip" else (336, 336, 3))
    assert np.abs(ours - ref).max() <= 1e-5


def test_a_checkpoint_without_a_vision_tower_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    _, d = tiny_llava_dir(tmp_path, "siglip")
    weights = os.path.join(d, "model.safetensors")
    tensors = {k: v for k, v in load_file(weights).items() if "vision_tower" not in k}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"vision_tower\.embeddings\.patch_embedding\.weight is missing"):
        load_llava(d, None, RuntimeOptions(), one_device())
    config = json.loads((tmp_path / "siglip" / "config.json").read_text())
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps(config["text_config"]))
    save_file({k.replace("language_model.", "", 1): v for k, v in tensors.items() if k.startswith("language_model.")},
              str(text_only / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    with pytest.raises(CheckpointError, match="has no vision tower"):
        load_llava(str(text_only), None, RuntimeOptions(), one_device())


def test_an_unreadable_image_is_a_clear_error():
    processor = ImageProcessor(height=32, width=32)
    with pytest.raises(DataError, match="llavacot example 7: not a readable image"):
        processor(b"not a png", what="llavacot example 7")


def test_our_peft_export_loads_in_peft_on_transformers_llava(tmp_path):
    """o_proj + qkv adapters (random B) on the language model: PEFT on LlavaForConditionalGeneration
    gives our logits, and the vision tower (which also has q/k/v_proj) gets no adapter."""
    import peft
    import torch

    from lora_jax.io.peft_adapter import export_peft
    from lora_jax.lora.spec import LoraSpec

    hf, d = tiny_llava_dir(tmp_path, "siglip")
    ours = load_llava(d, LoraSpec(("qkv", "o_proj"), rank=4, alpha=8.0), RuntimeOptions(), one_device())
    rng = np.random.default_rng(1)
    for target in ("qkv", "o_proj"):
        b = getattr(ours.language.layers, target).lora_b
        b.set_value(jax.numpy.asarray(rng.normal(size=b.get_value().shape) * 0.1, jax.numpy.float32))
    export_peft(ours, str(tmp_path / "adapter"), d)
    with_peft = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    adapted = [n for n, _ in with_peft.named_modules() if n.endswith("lora_A")]
    assert adapted and all("language_model" in n for n in adapted)
    ids = np.array([[5, 6] + [IMAGE_TOKEN] * 16 + [7, 8, 9]])
    pixels = rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = with_peft(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    got = np.asarray(ours(ids, pixels=pixels.transpose(0, 2, 3, 1)[:, None]))
    assert np.abs(got - ref).max() <= 1e-4
    base = np.asarray(
        load_llava(d, None, RuntimeOptions(), one_device())(ids, pixels=pixels.transpose(0, 2, 3, 1)[:, None])
    )
    assert np.abs(got - base).max() > 1e-3  # the adapters matter


def test_placeholders_in_the_prompt_must_match_the_record_images(tmp_path):
    from data import samples
    from data.samples import tiny_png
    from data.sft import SFTOptions, tokenize_example
    from data.tokenizer import Tokenizer

    tok = Tokenizer(samples.write_tiny_tokenizer(tmp_path / "tok", image_token=True))
    opts = SFTOptions(512, image_token_id=259, tokens_per_image=16, image_processor=ImageProcessor(height=32, width=32))
    record = {"id": "q1", "instruction": "What is shown?", "target": "A cube.", "images": [tiny_png(40, 30, 0)]}
    ex = tokenize_example(tok, record, opts)
    assert int(np.sum(ex["tokens"] == 259)) == 16 and ex["pixels"].shape == (1, 32, 32, 3)
    assert ex["loss_mask"][ex["tokens"] == 259].sum() == 0  # placeholders are prompt, never target
    with pytest.raises(DataError, match="example q2: more placeholders than images"):
        tokenize_example(tok, dict(record, id="q2", instruction="<image> twice?"), opts)
    with pytest.raises(DataError, match="example q3: not a readable image"):
        tokenize_example(tok, dict(record, id="q3", images=[b"broken"]), opts)


def test_runlocal_llavacot_oproj_trains_and_evaluates_end_to_end(tmp_path):
    """main.py on configs/llavacot_oproj.py:runlocal (a tiny random SigLIP tower + decoder): trains on
    the images, scores the suite by generating from image + prompt, exports a LLaVA-named adapter."""
    import subprocess

    from safetensors.numpy import load_file

    from tests.cli import ENV, ROOT, main_cmd, run_main

    every = "--config.eval.evaluators=('loss','generate','latency')"  # an image request's TTFT/TPOT too
    summary = run_main(tmp_path, every, config="configs/llavacot_oproj.py:runlocal")
    assert summary["final_step"] == 20 and summary["dataset"] == "llavacot" and summary["targets"] == ["o_proj"]
    assert np.isfinite(summary["eval_loss"])
    latency = json.loads((tmp_path / "eval" / "latency.json").read_text())
    assert all(latency["variants"][v]["tpot_ms_p95"] > 0 for v in ("base", "unmerged", "merged"))
    suite = json.loads((tmp_path / "eval" / "llavacot.json").read_text())
    assert suite["metric"] == "exact_match" and suite["num_examples"] >= 1
    keys = list(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert keys and all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == r"model\.language_model\.layers\.(\d+)\.(self_attn|mlp)\.(o_proj)"
    # mode=eval with that adapter on a fresh base: the same predictions as training's own evaluation.
    again = tmp_path / "eval_run"
    args = (
        "--config.mode=eval",
        f"--config.eval.adapter_dir={tmp_path / 'adapter'}",
        "--config.eval.evaluators=('generate',)",
    )
    proc = subprocess.run(main_cmd(again, *args, config="configs/llavacot_oproj.py:runlocal"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rescored = json.loads((again / "eval" / "llavacot.json").read_text())
    assert [e["prediction"] for e in rescored["examples"]] == [e["prediction"] for e in suite["examples"]]


def test_runlocal_arm_on_a_transformers_llava_exports_what_peft_loads(tmp_path):
    """The LLaVA-CoT o_proj runlocal arm trained on a tiny LLaVA saved by transformers (model.hf_dir):
    its exported adapter, loaded by PEFT on that LlavaForConditionalGeneration, gives our logits."""
    import subprocess

    import peft
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    from data import samples
    from lora_jax.io.peft_adapter import with_adapter
    from tests.cli import ENV, ROOT, main_cmd

    torch.manual_seed(0)
    config = LlavaConfig(  # the runlocal decoder's shape (configs/base.py), a SigLIP tower of 32x32 pixels
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
        ),
        text_config=Qwen2Config(
            vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        ),
        image_token_id=259,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )  # fmt: skip
    hf = LlavaForConditionalGeneration(config).eval()
    d = tmp_path / "hf"
    hf.save_pretrained(str(d))
    samples.write_tiny_tokenizer(d, image_token=True)  # its tokenizer: the bundled one with <image> = 259
    (d / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "SiglipImageProcessor", "size": {"height": 32, "width": 32}})
    )
    work = tmp_path / "run"
    args = (f"--config.model.hf_dir={d}", "--config.eval.evaluators=('loss',)", "--config.lora.dropout=0.0")
    proc = subprocess.run(main_cmd(work, *args, config="configs/llavacot_oproj.py:runlocal"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]

    with_peft = peft.PeftModel.from_pretrained(hf, str(work / "adapter")).eval()
    ours = with_adapter(load_llava(str(d), None, RuntimeOptions(), one_device()), str(work / "adapter"), str(d),
                        RuntimeOptions(), one_device())  # fmt: skip
    rng = np.random.default_rng(2)
    ids = np.array([[5, 6] + [259] * 16 + list(rng.integers(3, 250, 12))])
    pixels = rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = with_peft(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
        with with_peft.disable_adapter():  # PEFT injected its layers into hf itself
            base = with_peft(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    got = np.asarray(ours(ids, pixels=pixels.transpose(0, 2, 3, 1)[:, None]))
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(ref - base).max() > 1e-4  # training moved the adapter off the base
