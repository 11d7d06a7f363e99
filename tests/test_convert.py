"""The convert command: folder <-> one original-format file, LoRAs merged, precision cast, the
v-prediction and zero-terminal-SNR markers ComfyUI reads (comfy/supported_models.py, model_type)."""

import os
import stat

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from commands.convert import main
from ldm.lora import merge_lora
from ldm.model import LatentDiffusion
from ldm.single_file import save_single_file


def assert_same_weights(a: LatentDiffusion, b: LatentDiffusion) -> None:
    for name, part in a.parts().items():
        expected, got = part.state_dict(), getattr(b, name).state_dict()
        assert expected.keys() == got.keys(), name
        assert all(torch.equal(expected[key], got[key]) for key in expected), name


@pytest.fixture
def v_model_dir(tiny_model, tmp_path):
    """The tiny model as the demo model is: v-prediction on rescaled (zero terminal SNR) betas."""
    tiny_model.scheduler = DDIMScheduler.from_config(
        tiny_model.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )  # fmt: skip
    tiny_model.save(tmp_path / "v-model")
    return tmp_path / "v-model"


def test_folder_to_file_to_folder_gives_identical_weights_and_schedule(v_model_dir, tmp_path):
    assert main([str(v_model_dir), str(tmp_path / "one.safetensors")]) == 0
    with safe_open(tmp_path / "one.safetensors", framework="pt") as file:
        assert {"v_pred", "ztsnr"} <= set(file.keys())
        assert file.metadata()["modelspec.prediction_type"] == "v"
    assert main([str(tmp_path / "one.safetensors"), str(tmp_path / "back"), "--preset", "tiny"]) == 0
    before, after = LatentDiffusion.load(v_model_dir), LatentDiffusion.load(tmp_path / "back")
    assert_same_weights(before, after)
    config = after.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction", True, "trailing",
    )  # fmt: skip


def test_a_marked_fp16_file_loads_in_diffusers_from_single_file(v_model_dir, tmp_path):
    assert main([str(v_model_dir), str(tmp_path / "half.safetensors"), "--dtype", "fp16"]) == 0
    with safe_open(tmp_path / "half.safetensors", framework="pt") as file:
        assert {file.get_tensor(key).dtype for key in file.keys() if key not in ("v_pred", "ztsnr")} == {torch.float16}
    pipe = StableDiffusionPipeline.from_single_file(
        tmp_path / "half.safetensors", config=str(v_model_dir), local_files_only=True, torch_dtype=torch.float16
    )
    expected = LatentDiffusion.load(v_model_dir).unet.state_dict()
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, expected[key].half()), key


def test_a_merged_lora_equals_the_lora_merged_at_load_time(tiny_model_dir, tmp_path):
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
    torch.manual_seed(0)
    save_file({f"{layer}.lora_down.weight": torch.randn(2, 8), f"{layer}.lora_up.weight": torch.randn(8, 2),
               f"{layer}.alpha": torch.tensor(4.0)}, tmp_path / "lora.safetensors")  # fmt: skip
    argv = [str(tiny_model_dir), str(tmp_path / "merged"), "--lora", f"{tmp_path / 'lora.safetensors'}:0.5"]
    assert main(argv) == 0
    expected = LatentDiffusion.load(tiny_model_dir)
    merge_lora(expected, tmp_path / "lora.safetensors", 0.5)
    merged = LatentDiffusion.load(tmp_path / "merged")
    assert_same_weights(expected, merged)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    assert not torch.equal(merged.unet.state_dict()[key], LatentDiffusion.load(tiny_model_dir).unet.state_dict()[key])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["OUT.ckpt"], ".ckpt (pickle) is not written; use .safetensors"),
        (["OUT", "--lora", "missing.safetensors"], "--lora missing.safetensors: no such file"),
        (["OUT", "--preset", "tiny"], "--preset: only for a single-file source"),
        (["EXISTING"], "already exists; choose a new name"),
    ],
)
def test_mistakes_are_one_line_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr("commands.convert.load_model", lambda *args: pytest.fail("the model was read"))
    (tmp_path / "EXISTING").mkdir()
    output, *options = extra
    assert main([str(tiny_model_dir), str(tmp_path / output), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert: error: ") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["EXISTING"]


def test_the_shipped_model_through_a_file_and_back_draws_the_same_pixels(tmp_path):
    """The file records the architecture (the VAE's measured scaling_factor, 0.8129, not a preset's
    0.18215), the scheduler and sampling.json: folder -> file -> folder draws what the folder drew,
    at the model's own default steps and guidance, and so does the file itself."""
    import sample

    shipped = str(sample.DEFAULT_MODEL)
    assert main([shipped, str(tmp_path / "demo.safetensors")]) == 0
    assert main([str(tmp_path / "demo.safetensors"), str(tmp_path / "back")]) == 0
    back = LatentDiffusion.load(tmp_path / "back")
    assert back.vae.config.scaling_factor == pytest.approx(0.8128829311511508)
    assert (back.sampling.steps, back.sampling.guidance_scale) == (25, 2.5)
    pictures = []
    for source in (shipped, tmp_path / "demo.safetensors", tmp_path / "back"):
        outdir = tmp_path / f"run-{len(pictures)}"
        argv = ["--model", str(source), "--prompt", "a red circle", "--seed", "3", "--outdir", str(outdir)]
        assert sample.main([*argv, "--device", "cpu"]) == 0
        pictures.append(np.asarray(Image.open(outdir / "00000-3.png")))
    assert np.array_equal(pictures[0], pictures[1]) and np.array_equal(pictures[0], pictures[2])


def test_written_files_get_the_users_normal_permissions(tiny_model_dir, tmp_path):
    old = os.umask(0o022)
    try:
        assert main([str(tiny_model_dir), str(tmp_path / "one.safetensors")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "one.safetensors").stat().st_mode) == 0o644


def test_a_foreign_file_of_another_shape_says_how_to_name_its_architecture(tiny_model, tmp_path, capsys):
    """Without our header the file is taken for SD 1.5 (as before); its weights then do not fit."""
    save_single_file(tiny_model, tmp_path / "ours.safetensors")
    with safe_open(tmp_path / "ours.safetensors", framework="pt") as file:
        state = {key: file.get_tensor(key) for key in file.keys()}
    save_file(state, tmp_path / "foreign.safetensors")
    assert main([str(tmp_path / "foreign.safetensors"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not the sd15 architecture" in err and "--preset NAME" in err and len(err.splitlines()) == 1
    assert main([str(tmp_path / "foreign.safetensors"), str(tmp_path / "out"), "--preset", "tiny"]) == 0
