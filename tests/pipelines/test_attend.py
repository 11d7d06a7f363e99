"""Attend-and-Excite against diffusers 0.42.1's StableDiffusionAttendAndExcitePipeline
(pipelines/deprecated/stable_diffusion_attend_and_excite) on a tiny random SD model: the same picture
for the same seed and tokens, through the threshold steps' refinement loops; and how words are found."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionAttendAndExcitePipeline

from ldm.model import LatentDiffusion
from pipelines.attend import find_word, subject_tokens
from pipelines.samplers import make_scheduler
from pipelines.settings import GenerationError
from pipelines.text_to_image import TextToImagePipeline

PROMPT = "a red circle and a blue square"


def difference(a, b) -> int:
    return int(np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)).max())


def test_the_same_picture_as_diffusers_attend_and_excite(tiny_model_dir):
    """22 DDIM steps: the refinement loops of steps 0, 10 and 20 and the updates of steps 0..21 all
    run. The tiny UNet's cross-attention maps are 8x8 and 4x4 (16x16 latents would have 16x16): ours
    reads the 8x8 ones, the nearest to diffusers' 16x16 default, which its attn_res is told."""
    theirs = StableDiffusionAttendAndExcitePipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    theirs.scheduler = make_scheduler("ddim", theirs.scheduler)
    theirs.set_progress_bar_config(disable=True)
    options = dict(negative_prompt="green", guidance_scale=5.0, height=16, width=16)
    expected = theirs(PROMPT, token_indices=[3, 7], num_inference_steps=22, attn_res=(8, 8),
                      generator=torch.Generator().manual_seed(3), **options).images[0]  # fmt: skip
    pipe = TextToImagePipeline(LatentDiffusion.load(tiny_model_dir), device="cpu", dtype="fp32")
    settings = dict(steps=22, seed=3, scheduler="ddim", progress=False, **options)
    ours = pipe(PROMPT, attend="circle, square", **settings)[0]
    by_number = pipe(PROMPT, attend="3, 7", **settings)[0]
    without = pipe(PROMPT, **settings)[0]
    assert difference(ours, expected) <= 2
    assert difference(ours, by_number) == 0
    assert difference(ours, without) > 2  # the updates changed the picture


def test_it_runs_with_a_scaled_sampler_batches_and_attention_maps(tiny_model_dir):
    """Euler scales the UNet's input; a batch of two prompts gives each its own tokens and the same
    pictures as one at a time; attention maps are still drawn from the denoising passes alone."""
    pipe = TextToImagePipeline(LatentDiffusion.load(tiny_model_dir), device="cpu", dtype="fp32")
    settings = dict(steps=12, scheduler="euler", height=16, width=16, progress=False, attend="auto")
    prompts = ["a small red circle on the left and a blue square on the right", "a large green triangle at the top"]
    together = pipe.generate(prompts, seed=4, batch_size=2, attention_maps=True, **settings)
    apart = [pipe.generate(p, seed=4 + k, attention_maps=True, **settings)[0] for k, p in enumerate(prompts)]
    for a, b in zip(together, apart, strict=True):
        assert difference(a.image, b.image) <= 1
        assert [token for token, _ in a.attention_maps] == [token for token, _ in b.attention_maps]


def test_words_are_found_as_clip_splits_them_one_after_another():
    tokens = ["a", "cy", "an", "circle", "and", "a", "cy", "an", "square"]
    assert find_word(tokens, "cyan", 0) == (1, 3)
    assert find_word(tokens, "cyan", 3) == (6, 8)
    prompt = "a cyan circle and a cyan square"
    assert subject_tokens("cyan circle, cyan square", tokens, prompt) == [2, 3, 4, 7, 8, 9]
    assert subject_tokens("auto", tokens, prompt) == [2, 3, 4, 7, 8, 9]
    assert subject_tokens("4, 9", tokens, prompt) == [4, 9]
    with pytest.raises(GenerationError, match="'circle' is not a word of"):
        subject_tokens("square, circle", tokens, prompt)  # circle comes before square
    with pytest.raises(GenerationError, match="token 12 is not in"):
        subject_tokens("12", tokens, prompt)
    with pytest.raises(GenerationError, match="attend=auto: 'a dog' has no"):
        subject_tokens("auto", ["a", "dog"], "a dog")


def test_attend_mistakes_are_found_before_the_first_image(tiny_model_dir):
    pipe = TextToImagePipeline(LatentDiffusion.load(tiny_model_dir), device="cpu", dtype="fp32")
    with pytest.raises(GenerationError, match="'frog' is not a word of 'a blue square'"):
        pipe.generate(["a blue square", "a red circle"], attend="frog", steps=2, progress=False)
    with pytest.raises(GenerationError, match="not with a refiner or the hires fix"):
        pipe.generate("a red circle", attend="circle", hires_scale=2, steps=2, progress=False)
    with pytest.raises(GenerationError, match="not with prompt editing"):
        pipe.generate("a [red:blue:2] circle", attend="circle", steps=4, progress=False)
