"""Sampling with ControlNets against diffusers 0.42.1's StableDiffusionControlNetPipeline and
StableDiffusionXLControlNetPipeline on tiny random models: the same pictures for the same seeds,
with a scale, a start and end, and two ControlNets at once."""

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)
from PIL import Image

from conftest import perturb
from ldm.controlnet import ControlNet
from ldm.model import LatentDiffusion, ModelLoadError
from pipelines.control import Control
from pipelines.samplers import make_scheduler
from pipelines.settings import GenerationError
from pipelines.text_to_image import TextToImagePipeline


def control_image(seed: int, size: int = 24) -> Image.Image:
    """Random blocks: a control image that is no flat colour (resized to the output size in both)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((size, size), Image.NEAREST)


def saved_controlnets(model: LatentDiffusion, folder, count: int) -> list:
    """`count` ControlNets made from the model's UNet, perturbed so their zero convs act, saved."""
    paths = []
    for k in range(count):
        controlnet = perturb(ControlNet.from_unet(model.unet, 2), seed=10 + k)
        controlnet.save(folder / f"controlnet-{k}")
        paths.append(folder / f"controlnet-{k}")
    return paths


def difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)).max())


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("count", [1, 2])
def test_the_same_picture_as_diffusers_controlnet_pipeline(tiny_model_dir, tmp_path, scheduler, count):
    model = LatentDiffusion.load(tiny_model_dir)
    paths = saved_controlnets(model, tmp_path, count)
    images = [control_image(k) for k in range(count)]
    scales, starts, ends = [0.8, 0.5][:count], [0.0, 0.25][:count], [0.75, 1.0][:count]
    theirs = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_model_dir, controlnet=[ControlNetModel.from_pretrained(p) for p in paths], safety_checker=None
    )
    theirs.scheduler = make_scheduler(scheduler, theirs.scheduler)
    theirs.set_progress_bar_config(disable=True)
    options = dict(negative_prompt="a blue square", guidance_scale=5.0, height=16, width=16)
    expected = theirs("a red circle", images, num_inference_steps=8, generator=torch.Generator().manual_seed(7),
                      controlnet_conditioning_scale=scales, control_guidance_start=starts,
                      control_guidance_end=ends, **options).images[0]  # fmt: skip
    pipe = TextToImagePipeline(model, device="cpu", dtype="fp32")
    units = [
        Control(ControlNet.load(p), image, s, a, b)
        for p, image, s, a, b in zip(paths, images, scales, starts, ends, strict=True)
    ]
    ours = pipe("a red circle", steps=8, seed=7, scheduler=scheduler, control=units, progress=False, **options)[0]
    without = pipe("a red circle", steps=8, seed=7, scheduler=scheduler, progress=False, **options)[0]
    assert difference(ours, expected) <= 2
    assert difference(ours, without) > 10  # the ControlNets changed the picture


def test_sdxl_the_same_picture_as_diffusers(tiny_sdxl_dir, tmp_path):
    model = LatentDiffusion.load(tiny_sdxl_dir)
    (path,) = saved_controlnets(model, tmp_path, 1)
    theirs = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_sdxl_dir, controlnet=ControlNetModel.from_pretrained(path)
    )
    theirs.scheduler = make_scheduler("euler", theirs.scheduler)
    theirs.set_progress_bar_config(disable=True)
    options = dict(negative_prompt="blue", guidance_scale=5.0, height=32, width=32)
    expected = theirs("a red circle", image=control_image(3, 32), num_inference_steps=6,
                      generator=torch.Generator().manual_seed(2), controlnet_conditioning_scale=0.7,
                      **options).images[0]  # fmt: skip
    pipe = TextToImagePipeline(model, device="cpu", dtype="fp32")
    unit = Control(ControlNet.load(path), control_image(3, 32), 0.7)
    ours = pipe("a red circle", steps=6, seed=2, scheduler="euler", control=[unit], progress=False, **options)[0]
    assert difference(ours, expected) <= 2


def test_control_mistakes_are_one_line(tiny_model_dir, tiny_sdxl_dir):
    model = LatentDiffusion.load(tiny_model_dir)
    pipe = TextToImagePipeline(model, device="cpu", dtype="fp32")
    other = ControlNet.from_unet(LatentDiffusion.load(tiny_sdxl_dir).unet, 2)
    with pytest.raises(ModelLoadError, match="controlnet: made for a UNet with"):
        pipe("x", steps=2, control=[Control(other, control_image(0))], progress=False)
    with pytest.raises(GenerationError, match="control start=0.5, end=0.5"):
        Control(ControlNet.from_unet(model.unet, 2), control_image(0), start=0.5, end=0.5)
    with pytest.raises(
        GenerationError, match="it reads control images 8x the latents' size; this model's VAE downsamples 2x"
    ):
        pipe("x", steps=2, control=[Control(ControlNet.from_unet(model.unet, 8), control_image(0))], progress=False)
    unit = Control(ControlNet.from_unet(model.unet, 2), control_image(0))
    with pytest.raises(GenerationError, match="ControlNet: not with a refiner or the hires fix yet"):
        pipe("x", steps=2, hires_scale=2, control=[unit], progress=False)


@pytest.mark.parametrize("kind", ["img2img", "inpainting"])
def test_control_acts_in_image_to_image_and_inpainting(tiny_model_dir, tmp_path, kind):
    """A ControlNet changes an img2img or inpainted picture; at scale 0 it changes nothing at all."""
    model = LatentDiffusion.load(tiny_model_dir)
    (path,) = saved_controlnets(model, tmp_path, 1)
    pipe = TextToImagePipeline(model, device="cpu", dtype="fp32")
    init = control_image(9, 16)
    mask = Image.new("L", (16, 16))
    mask.paste(255, (0, 0, 8, 16))
    images = {"init_image": init} | ({"mask": mask} if kind == "inpainting" else {})
    options = dict(steps=6, seed=3, strength=0.8, progress=False, **images)
    plain = pipe("a red circle", **options)[0]
    controlled = pipe("a red circle", control=[Control(ControlNet.load(path), control_image(1))], **options)[0]
    silent = pipe("a red circle", control=[Control(ControlNet.load(path), control_image(1), 0.0)], **options)[0]
    assert difference(controlled, plain) > 5 and difference(silent, plain) == 0
