"""SDXL generation on a tiny random SDXL-shaped model, against diffusers' StableDiffusionXLPipeline
(diffusers 0.42.1, pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py): the same model
folder, prompt, negative prompt, seed, scheduler and guidance give the same picture."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from pipelines.samplers import make_scheduler
from pipelines.settings import GenerationError
from pipelines.text_to_image import TextToImagePipeline

SIZE = 16


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    return TextToImagePipeline.from_pretrained(tiny_sdxl_dir, device="cpu", dtype="fp32")


def theirs(tiny_sdxl_dir, scheduler: str, seeds: list[int], **options) -> list[Image.Image]:
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipeline.scheduler = make_scheduler(scheduler, pipeline.scheduler)
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipeline(generator=generators, output_type="pil", height=SIZE, width=SIZE, **options).images


def max_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)).max())


@pytest.mark.parametrize("scheduler", ["euler", "dpm++2m"])
def test_same_picture_as_diffusers_sdxl_pipeline(pipe, tiny_sdxl_dir, scheduler):
    common = dict(negative_prompt="a blue square", guidance_scale=6.0)
    expected = theirs(tiny_sdxl_dir, scheduler, [42, 43], prompt="a red circle", num_inference_steps=10,
                      num_images_per_prompt=2, **common)  # fmt: skip
    ours = pipe("a red circle", steps=10, seed=42, num_images=2, batch_size=2, scheduler=scheduler,
                height=SIZE, width=SIZE, progress=False, **common)  # fmt: skip
    assert np.asarray(expected[0]).std() > 10  # a picture, not a flat colour that would match anything
    assert [max_difference(a, b) for a, b in zip(ours, expected, strict=True)] <= [2, 2]
    assert max_difference(ours[0], ours[1]) > 10  # two seeds, two pictures


def test_size_conditioning_and_the_zeroed_empty_negative_prompt_as_in_diffusers(pipe, tiny_sdxl_dir):
    """Non-default size and crop, negative ones of their own, and no negative prompt: SDXL's
    force_zeros_for_empty_prompt guides away from zeros, not from the empty prompt's embedding."""
    sizes = dict(
        original_size=(48, 32),
        crop_top_left=(4, 8),
        target_size=(24, 24),
        negative_original_size=(8, 8),
        negative_target_size=(16, 16),
    )
    expected = theirs(tiny_sdxl_dir, "euler", [7], prompt="a red circle", num_inference_steps=8, guidance_scale=5.0,
                      negative_prompt=None, crops_coords_top_left=sizes["crop_top_left"],
                      **{k: v for k, v in sizes.items() if k != "crop_top_left"})  # fmt: skip
    ours = pipe("a red circle", steps=8, seed=7, scheduler="euler", guidance_scale=5.0, height=SIZE, width=SIZE,
                progress=False, **sizes)  # fmt: skip
    assert max_difference(ours[0], expected[0]) <= 2
    plain = pipe("a red circle", steps=8, seed=7, scheduler="euler", guidance_scale=5.0, height=SIZE, width=SIZE,
                 progress=False)  # fmt: skip
    assert max_difference(plain[0], ours[0]) > 2  # the size conditioning reached the picture


def test_second_prompts_as_in_diffusers_and_of_another_length_padded(pipe, tiny_sdxl_dir):
    """prompt_2 and negative_prompt_2 go to the second encoder only; a second prompt of two chunks
    beside a first of one is padded with the first encoder's empty chunk, as ComfyUI pads."""
    prompts = dict(prompt_2="a blue square", negative_prompt="green", negative_prompt_2="a cyan triangle")
    expected = theirs(tiny_sdxl_dir, "euler", [9], prompt="a red circle", num_inference_steps=6, guidance_scale=5.0,
                      **prompts)  # fmt: skip
    options = dict(steps=6, seed=9, scheduler="euler", guidance_scale=5.0, height=SIZE, width=SIZE, progress=False)
    ours = pipe("a red circle", **options, **prompts)[0]
    assert max_difference(ours, expected[0]) <= 2
    assert max_difference(ours, pipe("a red circle", **options, negative_prompt="green")[0]) > 2
    long_second = pipe.generate("a red circle", **options, prompt_2="a blue square, " * 30)[0]
    assert long_second.image.size == (SIZE, SIZE) and long_second.config.prompt_2.startswith("a blue square")


def test_size_conditioning_is_resolved_recorded_and_checked(pipe, tiny_model_dir):
    generated = pipe.generate("a red circle", steps=1, seed=0, height=SIZE, width=SIZE, progress=False,
                              crop_top_left=(0, 8))[0]  # fmt: skip
    config = generated.config
    assert (config.original_size, config.crop_top_left, config.target_size) == ((16, 16), (0, 8), (16, 16))
    assert config.negative_crop_top_left == (0, 8) and config.negative_target_size == (16, 16)  # the positive ones
    with pytest.raises(GenerationError, match="negative_original_size and negative_target_size go together"):
        pipe("a red circle", steps=1, negative_original_size=(8, 8), progress=False)
    with pytest.raises(GenerationError, match=r"target_size=\(0, 16\): must be at least 1"):
        pipe("a red circle", steps=1, target_size=(0, 16), progress=False)
    sd = TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    with pytest.raises(GenerationError, match="original_size: only SDXL models take size conditioning"):
        sd("a red circle", steps=1, original_size=(512, 512), progress=False)
    with pytest.raises(GenerationError, match="prompt_2, negative_prompt_2: only SDXL models have a second"):
        sd("a red circle", steps=1, prompt_2="a blue square", progress=False)


def test_emphasis_and_long_prompts_reach_both_encoders(pipe):
    """Weights change the picture; a prompt over 75 tokens runs as two chunks of both encoders."""
    options = dict(steps=4, seed=3, height=SIZE, width=SIZE, progress=False)
    plain, weighted = pipe("a red circle", **options)[0], pipe("a (red:1.6) circle", **options)[0]
    assert max_difference(plain, weighted) > 2
    long_prompt = "a red circle, " * 30
    assert pipe(long_prompt, **options)[0].size == (SIZE, SIZE)


def test_image_to_image_inpainting_and_attention_maps_run_on_sdxl(pipe):
    """The loop's other starts take SDXL's conditioning too: the masked-out pixels are kept exactly,
    and the maps are one per prompt word, over the two encoders' concatenated tokens."""
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.new("L", (SIZE, SIZE))
    mask.paste(255, (0, 0, SIZE // 2, SIZE))
    options = dict(steps=4, seed=1, progress=False, attention_maps=True)
    generated = pipe.generate("a red circle", init_image=photo, mask=mask, strength=0.7, **options)[0]
    kept = np.asarray(generated.image)[:, SIZE // 2 :]
    assert np.abs(kept.astype(int) - np.asarray(photo)[:, SIZE // 2 :]).max() <= 1
    assert [token for token, _ in generated.attention_maps] == ["a", "red", "circle"]
    assert all(heatmap.shape == (SIZE, SIZE) for _, heatmap in generated.attention_maps)
