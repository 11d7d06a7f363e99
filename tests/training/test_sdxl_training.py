"""Fine-tuning SDXL on the tiny SDXL model: both text encoders, the pooled text and each image's own
size ids (original size, crop, target; diffusers' train_text_to_image_sdxl.py and kohya's
sdxl_train_network.py condition on the same) reach the UNet; LoRA files load in diffusers."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from test_lora_sdxl import assert_same_weights, fused_by_diffusers
from training.conftest import recipe, run_recipe_then_sample

import train
from ldm.lora import merge_lora
from ldm.model import LatentDiffusion
from ldm.text import encode_captions
from ldm.train.cache import load_cache
from ldm.train.config import load_config
from ldm.train.loop import Trainer
from ldm.unet import UNet

# (width, height) -> its bucket (width, height) at resolution 32, step 16, and its size ids with a
# centre crop: (original h, w, crop top, left, target h, w)
IMAGES = {
    (64, 32): (32, 64, 4, 0, 16, 48),  # bucket 48x16: scaled to 48x24
    (32, 64): (64, 32, 0, 4, 48, 16),  # bucket 16x48: scaled to 24x48
    (40, 40): (40, 40, 0, 0, 32, 32),  # the square: scaled to 32x32
    (48, 40): (40, 48, 0, 3, 32, 32),  # the square: scaled to 38x32
}
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a red triangle"]


@pytest.fixture(scope="module")
def shaped_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shaped")
    generator = torch.Generator().manual_seed(0)
    for i, (size, caption) in enumerate(zip(IMAGES, CAPTIONS, strict=True)):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def sdxl_recipe(tmp_path, folder, model_dir, stage="lora", data=None, **sections):
    return recipe(
        tmp_path,
        folder,
        stage=stage,
        model={"preset": None, "pretrained": str(model_dir)},
        data={"resolution": 32, "buckets": True, "bucket_step": 16, "center_crop": True, "random_flip": False}
        | (data or {}),
        steps={"max": 6, "batch_size": 2},
        optim={"learning_rate": 1e-2},
        checkpoint={"every": 6},
        ema_decay=None,
        **sections,
    )


@pytest.fixture
def unet_calls(monkeypatch):
    """(latent shape, pooled, time ids) of every UNet call."""
    calls, forward = [], UNet.forward

    def recorded(self, latents, t, text, pooled=None, time_ids=None):
        calls.append((tuple(latents.shape), pooled, time_ids))
        return forward(self, latents, t, text, pooled, time_ids)

    monkeypatch.setattr(UNet, "forward", recorded)
    return calls


def test_an_sdxl_lora_with_buckets_conditions_on_each_image_size(tiny_sdxl_dir, shaped_images, tmp_path, unet_calls):
    config = load_config(sdxl_recipe(tmp_path, shaped_images, tiny_sdxl_dir, lora={"text_encoder": True}), [])
    trainer = Trainer(config)
    trainer.run()
    assert len(trainer.losses) == 6 and all(torch.isfinite(torch.tensor(trainer.losses)))
    seen = set()
    for shape, pooled, time_ids in unet_calls:
        assert pooled.shape == (shape[0], 12) and time_ids.shape == (shape[0], 6)
        for ids in time_ids.tolist():
            assert tuple(ids[4:]) == (shape[2] * 2, shape[3] * 2)  # the target: this batch's size (VAE: /2)
            seen.add(tuple(int(v) for v in ids))
    assert seen == set(IMAGES.values())

    path = tmp_path / "run" / "lora.safetensors"
    with safe_open(path, framework="pt") as file:
        keys, metadata = set(file.keys()), file.metadata()
    assert {key.split("_")[1] for key in keys} == {"unet", "te1", "te2"}
    assert any(key.startswith("lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k") for key in keys)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    model = LatentDiffusion.load(tiny_sdxl_dir)
    merge_lora(model, path)
    assert_same_weights(model, fused_by_diffusers(tiny_sdxl_dir, path, 1.0), LatentDiffusion.load(tiny_sdxl_dir))


def test_sdxl_caches_both_encoders_the_pooled_text_and_the_size_ids(tiny_sdxl_dir, shaped_images, tmp_path, unet_calls):
    cache = tmp_path / "cache"
    path = sdxl_recipe(tmp_path, shaped_images, tiny_sdxl_dir, data={"cache_latents": True, "cache_dir": str(cache)})
    Trainer(load_config(path, ["diffusion.caption_dropout=0.5"])).run()
    (file,) = cache.glob("latents-*.safetensors")
    cached = load_cache(file)
    model = LatentDiffusion.load(tiny_sdxl_dir)
    with torch.no_grad():
        text, pooled = encode_captions(model.text_encoders(), cached.captions, penultimate=True)
        empty_text, empty_pooled = encode_captions(model.text_encoders(), [""], penultimate=True)
    torch.testing.assert_close(cached.tensors["text"], text)  # 8 + 12 wide: both encoders, side by side
    torch.testing.assert_close(cached.tensors["pooled"], pooled)
    torch.testing.assert_close(cached.empty_pooled, empty_pooled[0])
    assert {tuple(int(v) for v in ids) for ids in cached.tensors["size_ids"].tolist()} == set(IMAGES.values())
    rows = {tuple(p.tolist()) for _, used, _ in unet_calls for p in used}
    assert tuple(empty_pooled[0].tolist()) in rows  # a dropped caption: the empty caption's pooled text


def test_full_sdxl_fine_tuning_trains_both_text_encoders_and_saves_an_sdxl_pipeline(
    tiny_sdxl_dir, shaped_images, tmp_path
):
    full = {"train_text_encoder": True}
    path = sdxl_recipe(tmp_path, shaped_images, tiny_sdxl_dir, stage="diffusion", diffusion=full)
    trainer = Trainer(load_config(path, ["steps.max=2", "checkpoint.every=2"]))
    trainer.run()
    assert len(trainer.wrapped) == 3  # the UNet and both text encoders
    base = LatentDiffusion.load(tiny_sdxl_dir)
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "run" / "model")
    for part in ("unet", "text_encoder", "text_encoder_2"):
        before, after = getattr(base, part).state_dict(), getattr(pipe, part).state_dict()
        assert any(not torch.equal(value, after[key]) for key, value in before.items()), part


def test_the_sdxl_lora_recipe_runs_and_sample_py_loads_its_file(tiny_sdxl_dir, shaped_images, tmp_path):
    """configs/lora-sdxl.yaml as the README runs it, made small; then `sample.py --lora` with the result."""
    run = run_recipe_then_sample("configs/lora-sdxl.yaml", shaped_images, tiny_sdxl_dir, tmp_path, 32,
                                 "data.bucket_step=16")  # fmt: skip
    assert Image.open(run / "validation" / "step-00000002.png").size == (2 * 32 + 4, 32)  # base | trained


def test_training_a_refiner_is_refused_in_one_line(shaped_images, tmp_path, capsys):
    path = recipe(tmp_path, shaped_images, model={"preset": "sdxl-refiner-tiny"}, steps={"max": 2})
    assert train.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model: sdxl-refiner-tiny is an SDXL refiner; training a refiner is not built yet" in err
    assert err.count("\n") == 1 and not (tmp_path / "run" / "model").exists()


def test_with_mixed_precision_a_lora_keeps_frozen_weights_in_it_and_adapters_in_fp32(
    tiny_sdxl_dir, shaped_images, tmp_path
):
    """As kohya's train_network.py and diffusers' LoRA scripts: half the memory for the frozen model."""
    path = sdxl_recipe(tmp_path, shaped_images, tiny_sdxl_dir, lora={"text_encoder": True})
    validation = ["validation.prompts=[a red circle]", "validation.every=2", "validation.steps=2"]
    config = load_config(path, ["steps.mixed_precision=bf16", "steps.max=2", *validation])
    trainer = Trainer(config, validate=train.sampler(config))  # validation in bf16: no fp32 copy of the UNet
    trainer.run()
    assert (tmp_path / "run" / "validation" / "step-00000002.png").is_file()
    model = trainer.model
    for name in ("unet", "text_encoder", "text_encoder_2"):
        weights = dict(getattr(model, name).named_parameters())
        assert {p.dtype for key, p in weights.items() if "lora_" in key} == {torch.float32}, name
        assert {p.dtype for key, p in weights.items() if "lora_" not in key} == {torch.bfloat16}, name
    assert next(model.vae.parameters()).dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(trainer.losses)))
    merge_lora(LatentDiffusion.load(tiny_sdxl_dir), tmp_path / "run" / "lora.safetensors")
