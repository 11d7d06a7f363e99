"""Bad input found from outside (issue 27): each is one line on stderr and exit 2, nothing written."""

import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import sample
import train
from conftest import perturbed_tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "options, message",
    [
        (["--seed", "18446744073709551615", "--num-images", "2"], "use a seed of 0 to 4294967295, as A1111"),
        (["--seed", "4294967295", "--num-images", "2"], "the seeds run to 4294967296"),
        (["--guidance-scale", "nan"], "guidance_scale=nan: must be a finite number"),
        (["--guidance-scale", "inf"], "guidance_scale=inf: must be a finite number"),
        (["--steps", "100000000"], "steps=100000000: must be 1 to 1000, the model's training timesteps"),
        (["--height", "65536", "--width", "65536"], "65536x65536: needs at least"),
        (["--height", "65536", "--width", "65536", "--vae-tiling"], "choose a smaller size"),
        (["--negative-prompt", "(red:nan)"], "a weight is a plain decimal number"),
        (["--prompt", "a (red:1e309) circle"], "a weight is a plain decimal number"),
    ],
)
def test_sample_py_refuses_in_one_line(tiny_model_dir, tmp_path, capsys, options, message):
    argv = ["--model", str(tiny_model_dir), "--prompt", "a red circle", "--outdir", str(tmp_path / "out"), *options]
    code = sample.main(argv + ["--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_model_with_nan_weights_says_so_instead_of_drawing_black(tmp_path, capsys):
    model = perturbed_tiny_model()
    with torch.no_grad():
        model.unet.conv_out.weight.fill_(float("nan"))
    model.save(tmp_path / "nan-model")
    argv = ["--model", str(tmp_path / "nan-model"), "--prompt", "a red circle", "--steps", "2", "--device", "cpu"]
    assert sample.main([*argv, "--outdir", str(tmp_path / "out")]) == 2
    assert "the denoised latents are not finite (NaN or infinity): the model's weights hold NaN" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def _damaged(folder, kind):
    if kind == "truncated weights":
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 9 // 10])
    elif kind == "truncated text encoder":
        weights = folder / "text_encoder" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif kind == "no unet config":
        (folder / "unet" / "config.json").unlink()
    elif kind == "malformed index":
        (folder / "model_index.json").write_text("[1, 2")
    elif kind == "malformed scheduler":
        (folder / "scheduler" / "scheduler_config.json").write_text("{")
    elif kind == "malformed vae config":
        (folder / "vae" / "config.json").write_text("{not json")


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated weights", "unet: unreadable weights, truncated or damaged"),
        ("truncated text encoder", "text_encoder: unreadable weights, truncated or damaged"),
        ("no unet config", "unet/config.json: missing"),
        ("malformed index", "model_index.json: not readable JSON"),
        ("malformed scheduler", "scheduler_config.json: not readable JSON"),
        ("malformed vae config", "is not a valid JSON file"),
    ],
)
def test_a_damaged_model_folder_is_one_line(tiny_model_dir, tmp_path, capsys, kind, message):
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    _damaged(tmp_path / "model", kind)
    argv = ["--model", str(tmp_path / "model"), "--prompt", "x", "--outdir", str(tmp_path / "out"), "--device", "cpu"]
    assert sample.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def bomb_png(path: Path, width: int = 14000, height: int = 14000) -> Path:
    """A PNG of a few dozen bytes whose header claims width x height pixels (and no pixel data):
    what a decompression bomb shows the opener before any pixel is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    text = b"parameters\x00a red circle\nSteps: 2, Sampler: Euler, CFG scale: 2, Seed: 1, Size: 64x64"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tEXt", text) + chunk(b"IEND", b""))
    return path


def test_an_image_bomb_through_from_png_is_one_line_from_a_real_process(tmp_path):
    """196 M pixels claimed (past twice PIL's limit of 89,478,485, where PIL raises DecompressionBombError)."""
    bomb = bomb_png(tmp_path / "bomb.png")
    done = subprocess.run([sys.executable, "sample.py", "--from-png", str(bomb), "--outdir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stderr == (
        f"sample.py: error: --from-png {bomb}: image too large (196,000,000 pixels, more than the 89,478,485 "
        "decoded here)\n"
    )


@pytest.mark.parametrize("flag", ["--init-image", "--mask", "--control-image"])
def test_an_image_bomb_anywhere_sample_py_takes_an_image_is_one_line(tiny_model_dir, tmp_path, capsys, flag):
    bomb, plain = bomb_png(tmp_path / "bomb.png", 10000, 10000), tmp_path / "plain.png"  # 100 M: PIL only warns
    Image.new("RGB", (64, 64)).save(plain)
    (tmp_path / "controlnet").mkdir()
    (tmp_path / "controlnet" / "config.json").write_text("{}")
    images = {"--init-image": plain, "--mask": plain, "--control-image": plain} | {flag: bomb}
    argv = ["--model", str(tiny_model_dir), "--prompt", "x", "--outdir", str(tmp_path / "out"),
            "--controlnet", str(tmp_path / "controlnet")]  # fmt: skip
    argv += [part for flag, image in images.items() for part in (flag, str(image))]
    assert sample.main(argv) == 2
    assert capsys.readouterr().err == (
        f"sample.py: error: {flag} {bomb}: image too large (10000x10000 = 100,000,000 pixels, more than the "
        "89,478,485 decoded here)\n"
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.learning_rate=-1", "optim.learning_rate=-1.0: must be a finite number above 0"),
        ("optim.learning_rate=nan", "optim.learning_rate=nan: must be a finite number above 0"),
        ("optim.text_encoder_lr=0", "optim.text_encoder_lr=0.0: must be a finite number above 0"),
    ],
)
def test_a_bad_learning_rate_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch, override, message):
    monkeypatch.setattr("ldm.train.loop.build_model", lambda config: pytest.fail("the model was built"))
    recipe = Path(__file__).resolve().parent.parent / "configs" / "shapes-diffusion.yaml"
    argv = ["--config", str(recipe), override, f"output_dir={tmp_path / 'run'}"]
    assert train.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_recipe_that_is_a_list_is_one_line(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("- model\n- data\n")
    assert train.main(["--config", str(tmp_path / "recipe.yaml")]) == 2
    assert "not a list" in capsys.readouterr().err


@pytest.mark.parametrize(
    "chunk, value, message",
    [
        ("dtype", "float8", "dtype 'float8' is none of fp32, fp16, bf16"),
        ("controlnet", "[{}]", "a ControlNet unit names no ControlNet ({})"),
        ("controlnet", '{"a": 1}', "a ControlNet unit names no ControlNet ('a')"),
        ("controlnet", '[{"name": "c", "scale": [], "start": 0, "end": 1, "preprocess": "none"}]', "TypeError"),
        ("lora", "style.safetensors:abc", "could not convert string to float: 'abc'"),
    ],
)
def test_a_png_with_a_damaged_setting_is_one_line(tmp_path, capsys, chunk, value, message):
    """Found by the outside check of issue 42: a damaged `controlnet` record was a traceback."""
    info = PngInfo()
    for key, text in {"prompt": "x", "scheduler": "euler", "seed": "1", chunk: value}.items():
        info.add_itxt(key, text)
    Image.new("RGB", (8, 8)).save(tmp_path / "damaged.png", pnginfo=info)
    assert sample.main(["--from-png", str(tmp_path / "damaged.png"), "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sample.py: error: --from-png {tmp_path / 'damaged.png'}: a malformed setting (") and (
        message in err and len(err.splitlines()) == 1
    ), err
