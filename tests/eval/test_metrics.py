"""CLIP score and FID through torchmetrics, on tiny random models built here (no downloads)."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.eval.metrics import as_uint8, clip_score, fid


def images(seed: int, n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_clip_score_is_100_times_the_mean_cosine_of_image_and_text_floored_at_0(tiny_clip):
    folder, model, processor = tiny_clip
    pictures, prompts = images(0, 2), ["a red circle", "a blue square"]
    score = clip_score(pictures, prompts, str(folder))
    inputs = processor(text=prompts, images=[np.asarray(p) for p in pictures], return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    image = image.pooler_output if hasattr(image, "pooler_output") else image
    text = text.pooler_output if hasattr(text, "pooler_output") else text
    cosine = torch.nn.functional.cosine_similarity(image, text)
    assert score == pytest.approx(max(float((100 * cosine).mean()), 0.0), abs=1e-3)


class MeanColour(torch.nn.Module):
    """A stand-in for Inception: uint8 images -> per-channel means and spreads (6 features)."""

    def forward(self, x):
        x = x.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_fid_is_zero_for_the_same_images_and_grows_with_difference():
    reference = images(1, 16)
    same = fid(reference, reference, feature=MeanColour())
    shifted = [Image.fromarray((np.asarray(p) // 2).astype(np.uint8)) for p in reference]
    assert abs(same) < 1e-3
    assert fid(shifted, reference, feature=MeanColour()) > 0.01


def test_images_become_uint8_batches():
    batch = as_uint8([Image.new("RGBA", (20, 10), (255, 0, 0, 0))], size=16)
    assert (
        batch.shape == (1, 3, 16, 16) and batch.dtype == torch.uint8 and batch[0, :, 0, 0].tolist() == [255, 255, 255]
    )
