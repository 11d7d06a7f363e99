"""Attend-and-Excite against diffusers 0.42.1's StableDiffusionAttendAndExcitePipeline
(pipelines/deprecated/stable_diffusion_attend_and_excite) on a tiny random SD model: the same picture
for the same seed and tokens, through the threshold steps' refinement loops; and how words are found."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionAttendAndExcitePipeline

from ldm.model import LatentDiffusion
from ldm.text import encode_prompts
from pipelines.attend import AttendExcite, binding, find_word, subjects
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
    pictures as one at a time; attention maps are still drawn from the denoising passes alone. `auto`
    leaves a lone object alone: its picture is the one without Attend-and-Excite."""
    pipe = TextToImagePipeline(LatentDiffusion.load(tiny_model_dir), device="cpu", dtype="fp32")
    settings = dict(steps=12, scheduler="euler", height=16, width=16, progress=False, attend="auto")
    prompts = ["a small red circle on the left and a blue square on the right", "a large green triangle at the top"]
    together = pipe.generate(prompts, seed=4, batch_size=2, attention_maps=True, **settings)
    apart = [pipe.generate(p, seed=4 + k, attention_maps=True, **settings)[0] for k, p in enumerate(prompts)]
    for a, b in zip(together, apart, strict=True):
        assert difference(a.image, b.image) <= 1
        assert [token for token, _ in a.attention_maps] == [token for token, _ in b.attention_maps]
    plain = pipe.generate(prompts, seed=4, batch_size=2, **{**settings, "attend": None})
    assert difference(together[0].image, plain[0].image) > 0  # the tiny model moves little: 1/255 here
    assert difference(together[1].image, plain[1].image) == 0


def test_words_are_found_as_clip_splits_them_one_after_another():
    tokens = ["a", "cy", "an", "circle", "and", "a", "cy", "an", "square"]
    assert find_word(tokens, "cyan", 0) == (1, 3)
    assert find_word(tokens, "cyan", 3) == (6, 8)
    prompt = "a cyan circle and a cyan square"
    both = [[[2, 3], [4]], [[7, 8], [9]]]  # two subjects: cyan (two tokens) circle, cyan square
    assert subjects("cyan circle, cyan square", tokens, prompt) == both
    assert subjects("auto", tokens, prompt) == both
    assert subjects("auto", tokens[:4], "a cyan circle") == []  # one object: nothing to attend to
    assert subjects("circle, square", tokens, prompt) == [[[4]], [[9]]]
    assert subjects("4, 9", tokens, prompt) == [[[4]], [[9]]]
    with pytest.raises(GenerationError, match="'circle' is not a word of"):
        subjects("square, circle", tokens, prompt)  # circle comes before square
    with pytest.raises(GenerationError, match="token 12 is not in"):
        subjects("12", tokens, prompt)
    with pytest.raises(GenerationError, match="attend=auto: 'a dog' has no"):
        subjects("auto", ["a", "dog"], "a dog")


def test_attend_mistakes_are_found_before_the_first_image(tiny_model_dir):
    pipe = TextToImagePipeline(LatentDiffusion.load(tiny_model_dir), device="cpu", dtype="fp32")
    with pytest.raises(GenerationError, match="'frog' is not a word of 'a blue square'"):
        pipe.generate(["a blue square", "a red circle"], attend="frog", steps=2, progress=False)
    with pytest.raises(GenerationError, match="not with a refiner or the hires fix"):
        pipe.generate("a red circle", attend="circle", hires_scale=2, steps=2, progress=False)
    with pytest.raises(GenerationError, match="not with prompt editing"):
        pipe.generate("a [red:blue:2] circle", attend="circle", steps=4, progress=False)


def test_the_binding_term_is_low_when_each_colour_lies_on_its_own_shape():
    """Maps over 4 pixels for the tokens (text positions 1..4) red, circle, blue, square: bound when
    red and circle share the left pixels and blue and square the right ones, unbound when swapped."""
    left, right = torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.5, 0.5])
    found = [[[1], [2]], [[3], [4]]]
    bound = binding(torch.stack([left, left, right, right], dim=1), found)
    swapped = binding(torch.stack([right, left, left, right], dim=1), found)
    everywhere = torch.full((4,), 0.25)
    assert bound.item() == pytest.approx(0.0, abs=1e-6)
    # each modifier far from its noun (1), and half the pairs across subjects on one place (1 - 0.5)
    assert swapped.item() == pytest.approx(1.5, abs=1e-6)
    assert 0.1 < binding(torch.stack([everywhere] * 4, dim=1), found).item() < 1.9
    assert binding(torch.stack([left, left, right, right], dim=1), [[[2]], [[4]]]).item() == 0.0  # one word each


def test_a_step_against_the_whole_loss_lowers_it(tiny_model_dir):
    """On the tiny model's maps, a small step down the gradient of excite plus binding lowers both
    the whole loss and the binding term: the term reaches the latents through the UNet."""
    model = LatentDiffusion.load(tiny_model_dir)
    pipe = TextToImagePipeline(model, device="cpu", dtype="fp32")
    found = subjects("red circle, blue square", pipe._prompt_tokens(PROMPT, "original"), PROMPT)
    attend = AttendExcite(model.unet, [found], (16, 16))
    text = encode_prompts(model.tokenizer, model.text_encoder, [PROMPT])
    t = torch.tensor([900])

    def losses(latents):
        excite, whole = attend.loss(lambda x: model.unet(x, t, text), latents)
        return whole, whole - excite

    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    whole, bind = losses(latents)
    (gradient,) = torch.autograd.grad(whole.sum(), [latents])
    with torch.no_grad():
        after, bind_after = losses(latents - 0.5 * gradient / gradient.norm())
    assert bind.item() > 0.0
    assert after.item() < whole.item()
    assert bind_after.item() < bind.item()


def test_sdxl_attends_through_its_two_encoders(tiny_sdxl_dir):
    """SDXL's UNet reads both encoders' tokens side by side at the same positions, with the pooled
    text and size ids beside them: the updates run there too and change the picture, as with SD."""
    pipe = TextToImagePipeline(LatentDiffusion.load(tiny_sdxl_dir), device="cpu", dtype="fp32")
    settings = dict(steps=12, seed=1, height=32, width=32, scheduler="ddim", progress=False)
    steered = pipe.generate(PROMPT, attend="auto", **settings)[0]
    assert steered.image.size == (32, 32)
    assert difference(steered.image, pipe.generate(PROMPT, **settings)[0].image) > 2
