"""LoRA training (stage=lora) on the tiny model: only adapters train and are saved, the file loads in
diffusers (`load_lora_weights`) and in our pipeline to the same picture, runs resume exactly."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from training.conftest import recipe, run_recipe_then_sample, run_until

import train
from conftest import folder_hash
from ldm.lora import merge_lora
from ldm.model import LatentDiffusion
from ldm.single_file import load_single_file
from ldm.train.config import load_config
from ldm.train.loop import Trainer
from pipelines.text_to_image import TextToImagePipeline

ADAPTED = 32  # the tiny UNet: 4 projections x 2 attentions x 4 transformer blocks


def lora_recipe(tmp_path, data, model_dir, **lora):
    return recipe(
        tmp_path,
        data,
        stage="lora",
        model={"preset": None, "pretrained": str(model_dir)},
        lora={"rank": 4, "alpha": 8.0, **lora},
        optim={"learning_rate": 3e-2},
        steps={"max": 6},
        checkpoint={"every": 3},
        ema_decay=None,
    )


def test_a_lora_run_trains_and_saves_only_adapters(tiny_model_dir, four_images, tmp_path):
    base = folder_hash(tiny_model_dir)
    options = ["loss.min_snr_gamma=5", "loss.noise_offset=0.05"]
    trainer = Trainer(load_config(lora_recipe(tmp_path, four_images, tiny_model_dir), options))
    trainer.run()
    run = tmp_path / "run"
    assert not (run / "model").exists() and folder_hash(tiny_model_dir) == base
    with safe_open(run / "lora.safetensors", framework="pt") as file:
        keys, metadata = set(file.keys()), file.metadata()
    assert len(keys) == 3 * ADAPTED and all(key.startswith("lora_unet_") for key in keys)
    assert {key.rpartition(".")[0].rpartition(".")[2] for key in keys if key.endswith("weight")} == {
        "lora_down",
        "lora_up",
    }
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8.0"
    assert metadata["ss_steps"] == "6" and metadata["ss_base_model_version"] == "sd_v1"
    assert (metadata["ss_min_snr_gamma"], metadata["ss_noise_offset"], metadata["ss_masked_loss"]) == (
        "5.0", "0.05", "False",
    )  # fmt: skip
    # what trained: the adapters alone, in the optimizer and in every checkpoint
    trained = [p for m in trainer.wrapped for p in m.parameters() if p.requires_grad]
    assert len(trained) == 2 * ADAPTED
    checkpoint = load_file(run / "checkpoints" / "step-00000006" / "model.safetensors")
    assert len(checkpoint) == 2 * ADAPTED and all(".lora_" in key for key in checkpoint)


def test_a_resumed_lora_run_reproduces_the_uninterrupted_one(tiny_model_dir, four_images, tmp_path, monkeypatch):
    Trainer(load_config(lora_recipe(tmp_path / "whole", four_images, tiny_model_dir), [])).run()
    path = lora_recipe(tmp_path / "split", four_images, tiny_model_dir)
    run_until(monkeypatch, load_config(path, []), 3)
    Trainer(load_config(path, ["checkpoint.resume=latest"])).run()
    whole, split = (load_file(tmp_path / name / "run" / "lora.safetensors") for name in ("whole", "split"))
    for key, value in whole.items():
        torch.testing.assert_close(split[key], value, atol=1e-6, rtol=0)


def picture(pipe, **options) -> np.ndarray:
    image = pipe("a red circle", steps=8, seed=3, height=16, width=16, progress=False, **options)[0]
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("kind", ["kohya", "diffusers"])
def test_the_lora_file_gives_the_same_picture_in_diffusers_and_here(tiny_model_dir, four_images, tmp_path, kind):
    """diffusers reads kohya keys through its own converter (loaders/lora_conversion_utils.py) and
    peft keys with lora_adapter_metadata directly; both with attention, feed-forward and ResNet
    convolution adapters, and a text-encoder adapter."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]  # LoCon too
    path = lora_recipe(tmp_path, four_images, tiny_model_dir, format=kind, text_encoder=True, targets=targets)
    Trainer(load_config(path, ["optim.text_encoder_lr=3e-2"])).run()
    lora = tmp_path / "run" / "lora.safetensors"
    with safe_open(lora, framework="pt") as file:
        parts = {key.split("_")[1] if kind == "kohya" else key.split(".")[0] for key in file.keys()}
    assert parts == ({"unet", "te"} if kind == "kohya" else {"unet", "text_encoder"})

    theirs = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    theirs.load_lora_weights(str(lora))
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(
        "a red circle", num_inference_steps=8, guidance_scale=7.5, height=16, width=16,
        generator=torch.Generator().manual_seed(3), output_type="np",
    ).images[0]  # fmt: skip
    expected = np.round(expected * 255).astype(np.int16)

    base = TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    ours = TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    ours.load_lora(lora)
    assert np.abs(picture(ours, guidance_scale=7.5) - picture(base, guidance_scale=7.5)).max() > 10  # it changed
    assert np.abs(picture(ours, guidance_scale=7.5) - expected).max() <= 2


def test_a_lora_at_scale_0_leaves_the_picture_unchanged(tiny_model_dir, four_images, tmp_path):
    Trainer(load_config(lora_recipe(tmp_path, four_images, tiny_model_dir), [])).run()
    base = TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    off = TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    off.load_lora(tmp_path / "run" / "lora.safetensors", scale=0.0)
    assert np.array_equal(picture(off), picture(base))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.rank=0"], "lora.rank=0: must be at least 1"),
        (["lora.targets=[to_q,attn9]"], "lora.targets: 'attn9' names no module of this model"),
        (["lora.targets=[norm1]"], "lora.targets: 'norm1' names GroupNorm, LayerNorm layers; LoRA adapts"),
        (["lora.text_encoder=true", "lora.text_targets=[qkv]"], "lora.text_targets: 'qkv' names no module"),
        (["lora.format=a1111"], "lora.format='a1111': use one of kohya, diffusers"),
        (["model.pretrained=null", "model.preset=tiny"], "stage=lora: adapts a trained model; set model.pretrained"),
    ],
)
def test_bad_lora_settings_are_one_line(tiny_model_dir, four_images, tmp_path, capsys, overrides, message):
    assert train.main(["--config", str(lora_recipe(tmp_path, four_images, tiny_model_dir)), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "lora.safetensors").exists()


def test_the_lora_recipe_runs_and_sample_py_loads_its_file(tiny_model_dir, four_images, tmp_path):
    """configs/lora.yaml as the README runs it, made small; then `sample.py --lora` with the result."""
    run_recipe_then_sample("configs/lora.yaml", four_images, tiny_model_dir, tmp_path, 16, "steps.batch_size=2")


def test_save_single_file_writes_the_model_with_the_lora_merged_in(tiny_model_dir, four_images, tmp_path):
    path = lora_recipe(tmp_path, four_images, tiny_model_dir, format="diffusers")
    Trainer(load_config(path, ["save_single_file=true", "steps.max=2"])).run()
    expected = LatentDiffusion.load(tiny_model_dir)
    merge_lora(expected, tmp_path / "run" / "lora.safetensors")
    written = load_single_file(tmp_path / "run" / "model.safetensors", preset="tiny")
    for name, part in expected.parts().items():
        for key, value in part.state_dict().items():
            assert torch.equal(getattr(written, name).state_dict()[key], value), (name, key)
    full = recipe(tmp_path / "full", four_images, steps={"max": 1})
    Trainer(load_config(full, ["save_single_file=true"])).run()
    trained = LatentDiffusion.load(tmp_path / "full" / "run" / "model")
    written = load_single_file(tmp_path / "full" / "run" / "model.safetensors", preset="tiny")
    assert all(torch.equal(v, written.unet.state_dict()[k]) for k, v in trained.unet.state_dict().items())
