"""stage=controlnet on the tiny models: only the ControlNet trains, the model is bit-identical after the
run, the result is a diffusers ControlNetModel folder (diffusers 0.42.1 loads it; sample.py draws with
it), runs resume exactly, the latent cache keeps the control images, SDXL trains too."""

import json

import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image
from training.conftest import assert_model_unchanged, recipe, run_until

import sample
import train
from commands.make_shapes import main as make_shapes
from conftest import folder_hash
from ldm.controlnet import ControlNet
from ldm.model import LatentDiffusion
from ldm.train.config import load_config
from ldm.train.loop import Trainer


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Four shapes pictures, each with its layout as NAME_control.png."""
    folder = tmp_path_factory.mktemp("layouts") / "data"
    assert make_shapes(["--out", str(folder), "--n", "4", "--size", "16", "--seed", "0", "--layouts"]) == 0
    return folder


def controlnet_recipe(tmp_path, folder, model_dir, **sections):
    return recipe(
        tmp_path,
        folder,
        **{"stage": "controlnet", "model": {"preset": None, "pretrained": str(model_dir)}, "steps": {"max": 4},
           "checkpoint": {"every": 2}} | sections,
    )  # fmt: skip


def test_only_the_controlnet_trains_and_diffusers_loads_what_it_saves(tiny_model_dir, layouts, tmp_path, capsys):
    base = folder_hash(tiny_model_dir)
    controls = [str(layouts / "00000_control.png"), str(layouts / "00001_control.png")]
    validation = {"prompts": ["a red circle", "a blue square"], "control_images": controls, "every": 4, "steps": 2}
    config = load_config(controlnet_recipe(tmp_path, layouts, tiny_model_dir, validation=validation), [])
    trainer = Trainer(config, validate=train.sampler(config))
    trainer.run()
    assert_model_unchanged(trainer, tiny_model_dir, base)
    (wrapped,) = trainer.wrapped
    assert isinstance(wrapped, ControlNet) and all(p.requires_grad for p in wrapped.parameters())
    assert wrapped.controlnet_mid_block.weight.abs().sum() > 0  # the zero convs have moved
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "controlnet", "validation"]
    theirs = ControlNetModel.from_pretrained(run / "controlnet")
    ours = ControlNet.load(run / "controlnet")
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value), key
    grid = Image.open(run / "validation" / "step-00000004.png")
    assert grid.size == (2 * (2 * 16) + 4, 2 * 16)  # base | trained, each a row per prompt: control, picture
    control = Image.open(controls[1]).convert("RGB")
    assert list(grid.crop((36, 16, 52, 32)).getdata()) == list(control.getdata())  # the control beside its picture

    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--prompt", "a blue square", "--steps", "2", "--height", "16",
            "--width", "16", "--controlnet", str(run / "controlnet"), "--control-image", controls[1],
            "--outdir", str(out)]  # fmt: skip
    assert sample.main(argv) == 0
    assert len(list(out.glob("*.png"))) == 1


def test_a_resumed_controlnet_run_reproduces_the_uninterrupted_one(tiny_model_dir, layouts, tmp_path, monkeypatch):
    whole = Trainer(load_config(controlnet_recipe(tmp_path / "whole", layouts, tiny_model_dir), []))
    whole.run()
    path = controlnet_recipe(tmp_path / "cut", layouts, tiny_model_dir)
    run_until(monkeypatch, load_config(path, []), 2)
    resumed = Trainer(load_config(path, ["checkpoint.resume=latest"]))
    resumed.run()
    for key, value in whole.stage.controlnet.state_dict().items():
        assert torch.equal(resumed.stage.controlnet.state_dict()[key], value), key


def test_cached_latents_keep_the_control_images_and_a_single_file_is_written(tiny_model_dir, layouts, tmp_path):
    """The control images go through the latent cache unchanged (8 bits, as their files hold them); with
    save_single_file the original `control_model.*` file is written too, and reads back the same."""
    cache = {"cache_latents": True, "cache_dir": str(tmp_path / "cache")}
    config = load_config(controlnet_recipe(tmp_path, layouts, tiny_model_dir, data=cache, save_single_file=True), [])
    trainer = Trainer(config)
    trainer.run()
    cached = trainer.dataset[(0, 1)]["control"]
    fresh = Image.open(layouts / "00001_control.png").convert("RGB")
    assert torch.equal(cached, torch.tensor(list(fresh.getdata())).float().T.reshape(3, 16, 16) / 255)
    run = tmp_path / "run"
    single = ControlNet.load_single_file(
        run / "controlnet.safetensors", LatentDiffusion.load(tiny_model_dir).unet.config
    )
    for key, value in ControlNet.load(run / "controlnet").state_dict().items():
        assert torch.equal(single.state_dict()[key], value), key


def test_an_sdxl_controlnet_trains_with_its_added_conditioning(tiny_sdxl_dir, layouts, tmp_path):
    config = load_config(controlnet_recipe(tmp_path, layouts, tiny_sdxl_dir, steps={"max": 2}), [])
    trainer = Trainer(config)
    trainer.run()
    assert trainer.stage.controlnet.config.unet.addition_embed_type == "text_time"
    assert json.loads((tmp_path / "run" / "controlnet" / "config.json").read_text())["addition_embed_type"] == (
        "text_time"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.pretrained=null", "model.preset=tiny"], "stage=controlnet: trains a ControlNet for a trained model"),
        (["validation.prompts=[a]"], "validation.control_images: one per validation prompt (1), not 0"),
        (["validation.prompts=[a]", "validation.control_images=[gone.png]"], "validation.control_images: gone.png"),
        (["diffusion.train_text_encoder=true"], "not diffusion.train_text_encoder"),
        (["stage=diffusion", "validation.prompts=[a]", "validation.control_images=[x.png]"], "for stage=controlnet"),
    ],
)
def test_controlnet_recipe_mistakes_are_one_line(tiny_model_dir, layouts, tmp_path, capsys, overrides, message):
    path = controlnet_recipe(tmp_path, layouts, tiny_model_dir)
    assert train.main(["--config", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_dataset_without_control_images_is_refused_before_any_work(tiny_model_dir, four_images, tmp_path, capsys):
    assert train.main(["--config", str(controlnet_recipe(tmp_path, four_images, tiny_model_dir))]) == 2
    assert "stage=controlnet: no image in" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe_file", ["configs/controlnet.yaml", "configs/shapes-controlnet.yaml"])
def test_the_shipped_recipes_run_and_sample_py_draws_with_the_result(recipe_file, tiny_model_dir, layouts, tmp_path):
    """Each recipe as the README and docs run it, made small (mixed precision off: this CPU may lack bf16)."""
    run, control = tmp_path / "run", str(layouts / "00000_control.png")
    options = [f"data.path={layouts}", f"output_dir={run}", f"model.pretrained={tiny_model_dir}",
               "data.resolution=16", f"data.cache_dir={tmp_path / 'cache'}", "steps.max=2",
               "steps.gradient_accumulation=1", "steps.mixed_precision=no", "report_to=none",
               "validation.prompts=[a red circle]", f"validation.control_images=[{control}]", "validation.every=2",
               "validation.steps=2"]  # fmt: skip
    assert train.main(["--config", recipe_file, *options]) == 0
    assert Image.open(run / "validation" / "step-00000002.png").size == (2 * 32 + 4, 16)
    argv = ["--model", str(tiny_model_dir), "--prompt", "a red circle", "--steps", "2", "--controlnet",
            str(run / "controlnet"), "--control-image", control, "--outdir", str(tmp_path / "out")]  # fmt: skip
    assert sample.main(argv) == 0
