"""GenerationConfig as the one declaration of the generation settings: sample.py's flags, the checks,
our PNG text and the A1111 infotext are read from it, so a setting declared there works everywhere."""

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

import sample
from pipelines.infotext import settings_from_png
from pipelines.outputs import RunSettings, png_fields, png_info
from pipelines.settings import GenerationConfig, SettingError, declared, value_type

ROOT = Path(__file__).resolve().parents[2]

# A resolved SDXL run with a refiner: every recorded setting has a value other than its default.
EVERY = GenerationConfig(
    negative_prompt="blurry, dark",
    prompt_2="at dusk",
    negative_prompt_2="noon",
    steps=12,
    scheduler="dpm++2m-karras",
    guidance_scale=4.5,
    seed=77,
    height=48,
    width=80,
    strength=0.35,
    emphasis="no-norm",
    attend="circle, 5",  # a comma in a value: quoted in the infotext
    original_size=(96, 160),
    crop_top_left=(4, 8),
    target_size=(48, 80),
    negative_original_size=(24, 40),
    negative_crop_top_left=(1, 2),
    negative_target_size=(48, 80),
    refiner_switch=0.7,
)
# The hires fix is text-to-image only: no init image's strength beside it.
HIRES = replace(EVERY, strength=None, refiner_switch=None, hires_scale=1.5, hires_upscaler="lanczos", hires_steps=9,
                hires_denoise=0.45)  # fmt: skip
RUN = RunSettings("models/x", "0123456789", (("style.safetensors", 0.8),), "models/refiner", "abcdef0123")


def saved(tmp_path: Path, prompt: str, config: GenerationConfig) -> Path:
    path = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_info(png_fields(prompt, config.seed, config, RUN)))
    return path


def test_the_two_configs_give_every_recorded_setting_a_value_of_its_own():
    for item, setting in declared():
        if setting.png:
            assert {getattr(EVERY, item.name), getattr(HIRES, item.name)} - {None, item.default}, item.name


@pytest.mark.parametrize("config", [EVERY, HIRES])
def test_every_recorded_setting_reads_back_from_our_png_text(tmp_path, config):
    recorded = [item.name for item, setting in declared() if setting.png and getattr(config, item.name) is not None]
    settings = settings_from_png(saved(tmp_path, "a (red) lighthouse", config))
    assert {name: settings[name] for name in recorded} == {name: getattr(config, name) for name in recorded}
    assert (settings["prompt"], settings["model"], settings["refiner"]) == ("a (red) lighthouse", "models/x",
                                                                           "models/refiner")  # fmt: skip
    assert settings["lora"] == [("style.safetensors", 0.8)]


@pytest.mark.parametrize("config", [EVERY, HIRES])
def test_every_infotext_setting_reads_back_from_the_a1111_text_alone(tmp_path, config):
    path = saved(tmp_path, "a (red) lighthouse", config)
    with Image.open(path) as image:
        parameters = image.text["parameters"]
    only_a1111 = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(only_a1111, pnginfo=png_info({"parameters": parameters}))
    settings = settings_from_png(only_a1111)
    named = [item.name for item, setting in declared() if setting.infotext and getattr(config, item.name) is not None]
    assert {name: settings[name] for name in named} == {name: getattr(config, name) for name in named}
    assert settings["negative_prompt"] == config.negative_prompt
    assert parameters.splitlines()[-1].startswith("Steps: 12, Sampler: DPM++ 2M Karras, CFG scale: 4.5, Seed: 77, "
                                                  "Size: 80x48, Model hash: 0123456789, Model: x, ")  # fmt: skip


def test_the_a1111_text_records_the_image_seed_not_the_runs_first():
    fields = png_fields("x", 80, EVERY, RUN)
    assert fields["seed"] == "80" and ", Seed: 80," in fields["parameters"]


def test_every_flag_is_the_declarations_and_the_readme_or_docs_name_it():
    parser = sample.make_parser()
    flags = {action.dest: action for action in parser._actions}
    docs = (ROOT / "README.md").read_text() + (ROOT / "docs" / "generation.md").read_text()
    for item, setting in declared():
        if setting.flag is None:
            assert item.name not in flags
            continue
        action, flag = flags[item.name], "--" + (setting.flag or item.name.replace("_", "-"))
        assert action.option_strings == [flag] and action.help == setting.help and action.default is None
        assert tuple(action.choices or ()) == setting.choices
        assert re.search(re.escape(flag) + r"\b", docs), f"{flag} is in neither README.md nor docs/generation.md"


def test_flags_left_out_keep_the_configs_defaults():
    args = sample.parse(["--prompt", "x"])
    assert args.config == GenerationConfig()


def test_flags_make_the_config_with_their_types():
    argv = ["--prompt", "x", "--steps", "9", "--guidance-scale", "3", "--seed", "-1", "--original-size", "64", "96",
            "--truncate-prompts", "--attention-maps", "--emphasis", "comfy"]  # fmt: skip
    config = sample.parse(argv).config
    assert config == GenerationConfig(steps=9, guidance_scale=3.0, seed=None, original_size=(64, 96), truncate=True,
                                      attention_maps=True, emphasis="comfy")  # fmt: skip


@pytest.mark.parametrize("item, setting", [(i, s) for i, s in declared() if s.low is not None or s.high is not None])
def test_each_bound_is_checked_when_the_config_is_made(item, setting):
    kind = value_type(item)
    outside = []
    if setting.low is not None:
        outside.append(setting.low - (1 if kind in (int, tuple) else 0.5))
    if setting.high is not None:
        outside.append(setting.high + (1 if kind in (int, tuple) else 0.5))
    for value in outside:
        value = (int(value), int(value)) if kind is tuple else kind(value)
        with pytest.raises(SettingError, match=rf"^{item.name}="):
            GenerationConfig(**{item.name: value})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"steps": "5"}, "steps='5': must be a whole number"),
        ({"steps": True}, "steps=True: must be a whole number"),
        ({"guidance_scale": math.nan}, "guidance_scale=nan: must be a finite number"),
        ({"scheduler": "karras"}, "scheduler='karras': use one of ddim, "),
        ({"original_size": (64,)}, "original_size=(64,): must be (height, width)"),
        ({"refiner_switch": 1}, "refiner_switch=1.0: the fraction of the noise schedule the base runs, in (0, 1)"),
        ({"seed": 2**32 - 2, "num_images": 3}, "the seeds run to 4294967296"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_setting(options, message):
    with pytest.raises(SettingError) as error:
        GenerationConfig(**options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_seed_minus_one_means_random_as_in_a1111():
    assert GenerationConfig(seed=-1).seed is None and replace(GenerationConfig(), seed=5).seed == 5


def test_the_servers_requests_take_every_declared_api_field():
    from server.a1111 import Img2ImgRequest, Txt2ImgRequest

    declared_api = {setting.api for _, setting in declared() if setting.api}
    assert declared_api <= set(Img2ImgRequest.model_fields)
    assert declared_api - {"denoising_strength"} <= set(Txt2ImgRequest.model_fields)
