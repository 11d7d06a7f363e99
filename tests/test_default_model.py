"""The demo model that ships in models/default: small enough to ship, and what it draws."""

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import sample
from ldm.eval.detector import detect

WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors")  # fmt: skip


def test_it_ships_as_fp16_safetensors_within_30_mb():
    files = [p for p in sample.DEFAULT_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    for name in WEIGHTS:
        assert {t.dtype for t in load_file(sample.DEFAULT_MODEL / name).values()} == {torch.float16}, name


def test_sample_py_without_a_model_draws_the_readme_prompt(tmp_path, capsys):
    """Colour, shape, size and position, on four seeds, at sample.py's defaults."""
    argv = ["--prompt", "a large red circle in the top left", "--num-images", "4", "--seed", "0"]
    assert sample.main([*argv, "--outdir", str(tmp_path)]) == 0
    images = sorted(p for p in tmp_path.iterdir() if p.suffix == ".png" and "grid" not in p.name)
    assert len(images) == 4
    for image in images:
        found = detect(np.asarray(Image.open(image).convert("RGB")))
        assert [(d.color, d.shape, d.size, d.position) for d in found] == [
            ("red", "circle", "large", "in the top left")
        ], image.name
