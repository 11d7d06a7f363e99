"""The SDXL base + refiner ensemble on tiny random models, against diffusers 0.42.1: the base
pipeline with `denoising_end` and latent output, then `StableDiffusionXLImg2ImgPipeline` (the
refiner's, sharing the base's VAE) with `denoising_start`, as diffusers documents the ensemble."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from PIL import Image

import sample
from conftest import perturbed_tiny_model
from ldm.model import LatentDiffusion
from pipelines.model_files import model_hash
from pipelines.samplers import make_scheduler
from pipelines.settings import GenerationError
from pipelines.text_to_image import TextToImagePipeline

SIZE = 16


@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models") / "sdxl-refiner-tiny"
    perturbed_tiny_model("sdxl-refiner-tiny").save(directory)
    return directory


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir, refiner_dir):
    pipe = TextToImagePipeline.from_pretrained(tiny_sdxl_dir, device="cpu", dtype="fp32")
    pipe.load_refiner(refiner_dir)
    return pipe


def theirs(base_dir, refiner_dir, scheduler: str, seeds: list[int], switch: float, **options) -> list[Image.Image]:
    base = StableDiffusionXLPipeline.from_pretrained(base_dir)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir, vae=base.vae)
    for pipeline in (base, refiner):
        pipeline.scheduler = make_scheduler(scheduler, pipeline.scheduler)
        pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    latents = base(generator=generators, output_type="latent", height=SIZE, width=SIZE, denoising_end=switch,
                   **options).images  # fmt: skip
    return refiner(generator=generators, image=latents, denoising_start=switch, output_type="pil", **options).images


def max_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)).max())


@pytest.mark.parametrize("scheduler, switch", [("euler", 0.8), ("dpm++2m", 0.6), ("heun", 0.7)])
def test_base_and_refiner_give_diffusers_ensemble_picture(pipe, tiny_sdxl_dir, refiner_dir, scheduler, switch):
    common = dict(negative_prompt="a blue square", guidance_scale=6.0)
    expected = theirs(tiny_sdxl_dir, refiner_dir, scheduler, [42, 43], switch, prompt="a red circle",
                      num_inference_steps=10, num_images_per_prompt=2, **common)  # fmt: skip
    ours = pipe.generate("a red circle", steps=10, seed=42, num_images=2, batch_size=2, scheduler=scheduler,
                         height=SIZE, width=SIZE, progress=False, refiner_switch=switch, **common)  # fmt: skip
    base_only = TextToImagePipeline(pipe.model, device="cpu", dtype="fp32")
    plain = base_only("a red circle", steps=10, seed=42, scheduler=scheduler, height=SIZE, width=SIZE,
                      progress=False, **common)  # fmt: skip
    assert max_difference(plain[0], expected[0]) > 2  # the refiner does change the picture
    assert ours[0].config.refiner_switch == switch
    for mine, reference in zip(ours, expected, strict=True):
        assert max_difference(mine.image, reference) <= 2


def test_the_refiner_layout_round_trips_with_diffusers(refiner_dir, tmp_path):
    index = json.loads((refiner_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and index["text_encoder"] == [None, None]
    assert index["requires_aesthetics_score"] and not index["force_zeros_for_empty_prompt"]
    theirs = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir)
    theirs.save_pretrained(tmp_path / "saved")
    model = LatentDiffusion.load(tmp_path / "saved")
    assert model.is_refiner and list(model.parts()) == ["unet", "vae", "text_encoder_2"]
    for key, value in theirs.unet.state_dict().items():
        assert torch.equal(model.unet.state_dict()[key], value)


def test_refiner_misuse_is_refused_in_one_line(pipe, tiny_model_dir, refiner_dir):
    image = Image.new("RGB", (SIZE, SIZE))
    cases = [
        (dict(refiner_switch=1.0), "refiner_switch=1.0: the fraction of the noise schedule the base runs"),
        (dict(init_image=image), "a refiner runs with text-to-image only"),
        (dict(attention_maps=True), "a refiner runs with text-to-image only"),
    ]
    for options, message in cases:
        with pytest.raises(GenerationError, match=message):
            pipe("a red circle", steps=2, height=SIZE, width=SIZE, progress=False, **options)
    sd = TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    with pytest.raises(GenerationError, match="refiner_switch: there is no refiner to switch to"):
        sd("a red circle", steps=2, refiner_switch=0.5, progress=False)
    with pytest.raises(GenerationError, match="this model is not SDXL"):
        sd.load_refiner(refiner_dir)
    with pytest.raises(GenerationError, match="load it as the base's refiner"):
        TextToImagePipeline.from_pretrained(refiner_dir, device="cpu", dtype="fp32")


def test_sample_py_refines_records_the_refiner_and_draws_it_again(tiny_sdxl_dir, refiner_dir, tmp_path, capsys):
    options = ["--model", tiny_sdxl_dir, "--prompt", "a red circle", "--seed", "5", "--steps", "4",
               "--refiner", refiner_dir, "--refiner-switch", "0.7"]  # fmt: skip
    assert sample.main([str(o) for o in options] + ["--outdir", str(tmp_path / "first")]) == 0
    first = tmp_path / "first" / "00000-5.png"
    text = Image.open(first).text
    assert (text["refiner"], text["refiner_hash"], text["refiner_switch"]) == (
        "sdxl-refiner-tiny",
        model_hash(refiner_dir),
        "0.7",
    )  # names and hashes, not paths
    assert f"Refiner: sdxl-refiner-tiny [{model_hash(str(refiner_dir))}], Refiner switch at: 0.7" in text["parameters"]
    folders = [part for folder in {tiny_sdxl_dir.parent, refiner_dir.parent} for part in ("--models-dir", str(folder))]
    assert sample.main(["--from-png", str(first), *folders, "--outdir", str(tmp_path / "again")]) == 0
    again = tmp_path / "again" / "00000-5.png"
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert Image.open(again).text == text
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--refiner-switch", "0.5"], "--refiner-switch needs --refiner"),
        (["--refiner", "REFINER", "--attention-maps"], "--refiner: text-to-image only"),
        (["--refiner", "./no-such-refiner"], "--refiner ./no-such-refiner: no such file or folder"),
    ],
)
def test_refiner_flags_are_checked_before_any_model_loads(
    tiny_sdxl_dir, refiner_dir, tmp_path, capsys, monkeypatch, argv, message
):
    def no_loading(*args, **options):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(TextToImagePipeline, "from_pretrained", no_loading)
    argv = [str(refiner_dir) if a == "REFINER" else a for a in argv]
    assert sample.main(["--model", str(tiny_sdxl_dir), "--prompt", "x", *argv, "--outdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_an_sdxl_base_can_refine_too(tiny_sdxl_dir):
    """diffusers' img2img pipeline takes a base model with its six time ids; so does our refiner slot."""
    pipe = TextToImagePipeline.from_pretrained(tiny_sdxl_dir, device="cpu", dtype="fp32")
    plain = pipe("a red circle", steps=4, seed=1, height=SIZE, width=SIZE, progress=False)[0]
    pipe.load_refiner(tiny_sdxl_dir)
    refined = pipe("a red circle", steps=4, seed=1, height=SIZE, width=SIZE, progress=False, refiner_switch=0.5)[0]
    assert max_difference(plain, refined) == 0  # the same model both sides: the same steps
