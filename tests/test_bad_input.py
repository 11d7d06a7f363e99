"""Bad input found from outside (issue 27): each is one line on stderr and exit 2, nothing written."""

import pytest
import torch

import sample
from conftest import perturbed_tiny_model


@pytest.mark.parametrize(
    "options, message",
    [
        (["--seed", "18446744073709551615", "--num-images", "2"], "seeds are 0 to 4294967295, as A1111 writes them"),
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
