"""Hires fix, as A1111's txt2img does it (modules/processing.py, `sample_hr_pass`): the first pass at
the asked size, an upscale, then image-to-image at the larger size running `hires_steps` steps."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sample
from pipelines.hires import hires_size, schedule_length
from pipelines.pictures import image_to_tensor, tensor_to_image
from pipelines.settings import GenerationError
from pipelines.text_to_image import TextToImagePipeline

OPTIONS = dict(seed=2, height=16, width=24, scheduler="euler", progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")


def test_the_second_pass_runs_hires_steps_at_the_larger_size(pipe):
    calls = []
    on_step = lambda step, steps, latents: calls.append((steps, tuple(latents.shape[2:])))  # noqa: E731
    generated = next(pipe.generate_each("a circle", steps=4, hires_scale=2, hires_steps=3, hires_denoise=0.7,
                                        on_step=on_step, **OPTIONS))  # fmt: skip
    assert generated.image.size == (48, 32)
    assert calls == [(4, (8, 12))] * 4 + [(3, (16, 24))] * 3  # the tiny VAE halves each side
    config = generated.config
    assert (config.hires_scale, config.hires_upscaler, config.hires_steps, config.hires_denoise) == (2.0, "latent",
                                                                                                   3, 0.7)  # fmt: skip
    assert (config.height, config.width) == (16, 24)  # the first pass's, as A1111's Size


def test_at_denoise_zero_the_picture_is_the_upscaled_first_pass(pipe, monkeypatch):
    """Latent: the first pass's latents resized bilinearly (A1111's "Latent"); Lanczos: its picture
    resized with Lanczos and encoded again."""
    decoded = []
    real_decode = TextToImagePipeline._decode
    monkeypatch.setattr(TextToImagePipeline, "_decode", lambda self, x: decoded.append(x) or real_decode(self, x))
    pipe("a circle", steps=3, **OPTIONS)
    first = decoded.pop()
    pipe("a circle", steps=3, hires_scale=2, hires_upscaler="latent", hires_denoise=0, **OPTIONS)
    expected = F.interpolate(first, size=(16, 24), mode="bilinear", antialias=False)
    torch.testing.assert_close(decoded.pop(), expected, rtol=0, atol=0)
    pipe("a circle", steps=3, hires_scale=2, hires_upscaler="lanczos", hires_denoise=0, **OPTIONS)
    final, picture = decoded.pop(), decoded.pop()
    torch.testing.assert_close(picture, first, rtol=0, atol=0)
    with torch.no_grad():
        resized = image_to_tensor(tensor_to_image(real_decode(pipe, first).float()[0]), 48, 32)
        torch.testing.assert_close(final, pipe._encode_image(resized), rtol=0, atol=0)


def test_steps_and_sizes_as_a1111_counts_them():
    assert schedule_length(20, 0.5) == 40 and schedule_length(15, 0.7) == 22 and schedule_length(7, 1.0) == 7
    assert all(int(schedule_length(n, d) * d) == n for n in range(1, 60) for d in (0.05, 0.3, 0.45, 0.7, 0.99))
    assert hires_size(512, 768, 1.5, 8) == (768, 1152) and hires_size(64, 64, 1.3, 8) == (80, 80)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(hires_steps=5), "hires_steps: set with hires_scale"),
        (dict(hires_scale=2, attention_maps=True), "hires fix: text-to-image only"),
        (dict(hires_scale=0.5), "hires_scale=0.5: must be 1 to 8"),
        (dict(hires_scale=2, hires_upscaler="esrgan"), "hires_upscaler='esrgan': use one of latent, lanczos"),
    ],
)
def test_bad_hires_settings_are_one_line(pipe, options, message):
    with pytest.raises(GenerationError, match=message):
        pipe("a circle", steps=2, **OPTIONS | options)


def test_sample_py_writes_and_reads_the_a1111_fields(tiny_model_dir, tmp_path):
    argv = ["--model", str(tiny_model_dir), "--prompt", "a circle", "--steps", "3", "--seed", "4", "--height", "16",
            "--width", "16", "--hires-scale", "1.5", "--hires-upscaler", "lanczos", "--device", "cpu"]  # fmt: skip
    assert sample.main([*argv, "--outdir", str(tmp_path / "a")]) == 0
    first = Image.open(tmp_path / "a" / "00000-4.png")
    assert first.size == (24, 24)
    assert "Denoising strength: 0.7, Hires upscale: 1.5, Hires upscaler: Lanczos" in first.text["parameters"]
    only_a1111 = tmp_path / "a1111.png"
    first.save(only_a1111, pnginfo=_parameters_only(first.text["parameters"]))
    again = ["--from-png", str(only_a1111), "--model", str(tiny_model_dir), "--device", "cpu"]
    assert sample.main([*again, "--outdir", str(tmp_path / "b")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "00000-4.png")), np.asarray(first))


def _parameters_only(text: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("parameters", text)
    return info
