"""Generation on the tiny random model: parity with diffusers, seeds, img2img, inpainting, maps."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from conftest import perturb
from ldm.autoencoder import images_to_latents, latents_to_images
from ldm.model import LatentDiffusion, read_preset
from pipelines.choices import SCHEDULERS
from pipelines.pictures import image_to_tensor, tensor_to_image
from pipelines.samplers import make_scheduler
from pipelines.settings import GenerationError, SettingError
from pipelines.text_to_image import TextToImagePipeline

SIZE = 16  # the tiny model's images: 8x8 latents


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def max_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++2m"])
def test_same_picture_as_diffusers_stable_diffusion_pipeline(pipe, tiny_model_dir, scheduler):
    theirs = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    theirs.scheduler = make_scheduler(scheduler, theirs.scheduler)
    theirs.set_progress_bar_config(disable=True)
    options = dict(negative_prompt="a blue square", guidance_scale=6.0, height=SIZE, width=SIZE)
    expected = theirs(
        "a red circle",
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(42),
        output_type="pil",
        **options,
    ).images[0]
    ours = pipe("a red circle", steps=10, seed=42, scheduler=scheduler, progress=False, **options)[0]
    assert pixels(expected).std() > 10  # a picture, not a flat colour that would match anything
    assert max_difference(ours, expected) <= 2


def test_same_seed_same_image_and_another_seed_another(pipe):
    first, again, other = (pipe("a red circle", steps=4, seed=s, progress=False)[0] for s in (3, 3, 4))
    assert max_difference(first, again) == 0
    assert max_difference(first, other) > 10


@pytest.mark.parametrize("scheduler", ["ddim", "euler-ancestral"])  # ancestral: fresh noise every step
def test_image_k_of_a_batched_run_is_the_single_run_with_seed_plus_k(pipe, scheduler):
    options = dict(steps=4, scheduler=scheduler, progress=False)
    run = pipe.generate(["a red circle", "a green square"], num_images=2, batch_size=3, seed=10, **options)
    assert [(g.prompt, g.seed) for g in run] == [
        ("a red circle", 10),
        ("a red circle", 11),
        ("a green square", 12),
        ("a green square", 13),
    ]
    for generated in run:
        single = pipe(generated.prompt, seed=generated.seed, **options)[0]
        assert max_difference(generated.image, single) <= 1


def test_every_scheduler_runs(pipe):
    for name in SCHEDULERS:
        image = pipe("a red circle", steps=2, scheduler=name, seed=0, guidance_scale=1.0, progress=False)[0]
        assert image.size == (SIZE, SIZE), name


def test_an_unknown_scheduler_lists_the_valid_ones(pipe):
    with pytest.raises(SettingError, match="scheduler='euler-a': use one of ddim, ddpm, pndm"):
        pipe("a red circle", scheduler="euler-a", progress=False)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    generator = np.random.default_rng(0)
    return Image.fromarray(generator.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def test_image_to_image_with_strength_0_returns_the_input_through_the_vae(pipe, photo):
    out = pipe("a red circle", init_image=photo, strength=0.0, seed=1, progress=False)[0]
    with torch.no_grad():
        latents = images_to_latents(pipe.model.vae, image_to_tensor(photo, SIZE, SIZE), mean=True)
        expected = tensor_to_image(latents_to_images(pipe.model.vae, latents)[0])
    assert max_difference(out, expected) == 0


def test_image_to_image_strength_sets_how_far_the_picture_moves(pipe, photo):
    def distance(strength: float) -> float:
        out = pipe("a red circle", init_image=photo, strength=strength, steps=10, seed=1, progress=False)[0]
        return float(np.abs(pixels(out) - pixels(photo)).mean())

    assert distance(0.2) < distance(0.9)


def test_inpainting_keeps_the_unmasked_region_and_repaints_the_masked_one(pipe, photo):
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2 :] = 255  # repaint the right half
    out = pixels(pipe("a red circle", init_image=photo, mask=Image.fromarray(mask), seed=2, progress=False)[0])
    assert np.array_equal(out[:, : SIZE // 2], pixels(photo)[:, : SIZE // 2])
    assert np.abs(out[:, SIZE // 2 :] - pixels(photo)[:, SIZE // 2 :]).mean() > 10


def test_attention_maps_one_per_token_non_negative_normalised_image_sized(pipe):
    (generated,) = pipe.generate("a large red circle", steps=3, seed=0, attention_maps=True, progress=False)
    assert [token for token, _ in generated.attention_maps] == ["a", "large", "red", "circle"]
    for _, heatmap in generated.attention_maps:
        assert heatmap.shape == (SIZE, SIZE)
        assert heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)


def test_attention_maps_do_not_change_the_image(pipe):
    plain = pipe("a red circle", steps=3, seed=0, progress=False)[0]
    (mapped,) = pipe.generate("a red circle", steps=3, seed=0, attention_maps=True, progress=False)
    assert max_difference(plain, mapped.image) <= 1


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(height=20), "height=20: must be a positive multiple of 8"),
        (dict(width=0), "width=0: must be a positive multiple of 8"),
        (dict(strength=1.5, init_image=Image.new("RGB", (16, 16))), "strength=1.5: must be 0 to 1"),
        (dict(mask=Image.new("L", (16, 16))), "a mask needs an init image"),
        (dict(steps=0), "steps=0: must be at least 1"),
        (dict(steps=1001), "steps=1001: must be 1 to 1000, the model.s training timesteps"),
        (dict(num_images=0), "num_images=0: must be at least 1"),
    ],
)
def test_bad_requests_are_refused_with_one_line(pipe, options, message):
    with pytest.raises(GenerationError, match=message):
        pipe("a red circle", progress=False, **options)


def test_a_9_channel_inpainting_unet_sees_the_mask_and_the_kept_image(photo, tmp_path):
    spec = read_preset("tiny")
    spec["unet"]["in_channels"] = 9  # latents 4 + mask 1 + masked-image latents 4
    model = LatentDiffusion.from_spec(spec)
    for part in model.parts().values():
        perturb(part)
    pipe = TextToImagePipeline(model, device="cpu", dtype="fp32")
    seen = []
    model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[SIZE // 2 :] = 255
    out = pixels(pipe("a red circle", init_image=photo, mask=Image.fromarray(mask), strength=1.0, steps=2, seed=0)[0])
    assert seen == [(2, 9, 8, 8)] * 2  # unconditional and conditional, 9 channels, every step
    assert np.array_equal(out[: SIZE // 2], pixels(photo)[: SIZE // 2])
    with pytest.raises(GenerationError, match="inpainting model .* give it an init image and a mask"):
        pipe("a red circle", progress=False)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_runs_and_stays_close_to_fp32(tiny_model_dir, dtype):
    half = TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=dtype)
    full = TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    assert half.model.unet.conv_in.weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    options = dict(steps=3, seed=0, scheduler="ddim", progress=False)
    assert np.abs(pixels(half("a red circle", **options)[0]) - pixels(full("a red circle", **options)[0])).mean() < 8


def test_vae_tiling_is_switched_on_by_the_option_while_generating(tiny_model_dir, monkeypatch):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu", vae_tiling=True)
    vae, tiled = pipe.model.vae, []
    decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda *args, **kwargs: tiled.append(vae.use_tiling) or decode(*args, **kwargs))
    pipe("a red circle", steps=1, seed=0, progress=False)
    assert tiled == [True] and not vae.use_tiling


def test_a_batch_is_decoded_one_image_at_a_time_while_generating(tiny_model_dir, monkeypatch):
    """The VAE sliced (diffusers' enable_slicing): decoding memory does not grow with the batch."""
    pipe = TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu")
    vae, batches = pipe.model.vae, []
    decode = vae._decode
    monkeypatch.setattr(vae, "_decode", lambda z, *args, **kwargs: batches.append(len(z)) or decode(z, *args, **kwargs))
    pipe("a red circle", steps=1, seed=0, num_images=3, batch_size=3, progress=False)
    assert batches == [1, 1, 1] and not vae.use_slicing


def test_a_negative_prompt_runs_at_its_own_length(pipe, monkeypatch):
    """As A1111's default: a two-chunk prompt with a one-chunk negative prompt is not padded to two
    chunks; the unconditional pass runs apart, on the negative prompt's 77 tokens alone."""
    lengths = []
    unet = pipe.unet
    monkeypatch.setattr(
        pipe, "unet", lambda x, t, text, *sdxl: lengths.append((len(x), text.shape[1])) or unet(x, t, text, *sdxl)
    )
    long_prompt = "a red circle, " * 30  # 120 tokens: two chunks
    pipe(long_prompt, negative_prompt="a blue square", steps=2, seed=0, progress=False)
    assert lengths == [(1, 77), (1, 154)] * 2  # per step: unconditional, then conditional
    lengths.clear()
    pipe("a red circle", negative_prompt="a blue square", steps=2, seed=0, progress=False)
    assert lengths == [(2, 77)] * 2  # the same length: one batch, as before


def test_the_run_carries_its_resolved_settings_and_unknown_options_are_named(pipe):
    (generated,) = pipe.generate("a red circle", steps=2, progress=False)
    config = generated.config  # every default filled in: what the PNG metadata records
    assert (config.steps, config.guidance_scale, config.scheduler, config.height, config.strength) == (
        2, 7.5, "ddim", SIZE, None
    )  # fmt: skip
    assert generated.seed == config.seed and config.seed is not None  # a random seed, recorded
    with pytest.raises(GenerationError, match=r"unknown option\(s\) \['stepz'\]"):
        pipe.generate("a red circle", stepz=2)


def test_a_pipeline_leaves_the_model_it_was_handed_as_it_was(tiny_model):
    """Training hands its model to the pipeline for validation: same dtype, device and mode after."""
    tiny_model.unet.train()
    before = {name: (next(part.parameters()).dtype, part.training) for name, part in tiny_model.parts().items()}
    for dtype in ("fp32", "bf16"):
        pipe = TextToImagePipeline(tiny_model, device="cpu", dtype=dtype, vae_tiling=True)
        pipe("a red circle", steps=1, seed=0, progress=False)
        assert {
            name: (next(part.parameters()).dtype, part.training) for name, part in tiny_model.parts().items()
        } == before
        assert not tiny_model.vae.use_tiling
    assert next(pipe.model.unet.parameters()).dtype == torch.bfloat16  # its own copy, in its own precision
