"""CLIP score and FID for models trained on real data, through torchmetrics, with weights the user
has locally (nothing is downloaded here).

    python -m commands.eval_metrics --model runs/my-model/model --prompt-file prompts.txt \\
        --clip-model path/to/clip-vit-large-patch14 --reference-dir my-images [--inception-weights pt_inception.pth]

CLIP score: 100 x the cosine similarity of image and prompt embeddings (higher follows the text
better). FID: the Fréchet distance between Inception features of generated and reference
images (lower is closer to the data); it needs the torch-fidelity package for the Inception
network, and its weights file when offline. The command line that draws the images is
commands/eval_metrics.py.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from ldm.data.datasets import IMAGE_SUFFIXES
from ldm.data.transforms import to_rgb
from ldm.errors import UserError
from ldm.images import read_image


def as_uint8(images: list[Image.Image], size: int | None = None) -> Tensor:
    """PIL images -> (N, 3, H, W) uint8, resized to size x size when given."""
    arrays = []
    for image in images:
        image = to_rgb(image)
        if size is not None:
            image = image.resize((size, size), Image.BICUBIC)
        arrays.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(arrays)


class FeaturesAsTensors(nn.Module):
    """transformers 5's get_*_features return output objects; torchmetrics expects the tensors."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args) -> Tensor:
        return _tensor(self.model.get_image_features(*args))

    def get_text_features(self, *args) -> Tensor:
        return _tensor(self.model.get_text_features(*args))


def _tensor(output) -> Tensor:
    return output if isinstance(output, Tensor) else output.pooler_output


def clip_score(images: list[Image.Image], prompts: list[str], clip_model: str) -> float:
    """`clip_model`: a local folder with a transformers CLIPModel and CLIPProcessor."""

    try:
        model, processor = CLIPModel.from_pretrained(clip_model), CLIPProcessor.from_pretrained(clip_model)
    except OSError as error:
        raise UserError(f"{clip_model}: not a local CLIP model folder ({str(error).splitlines()[0]})") from None
    # a loader, not a hub name; all the images are here (gathered from every process first), so no sync
    metric = CLIPScore(model_name_or_path=lambda: (FeaturesAsTensors(model), processor), sync_on_compute=False)
    metric.update(as_uint8(images), prompts)
    return float(metric.compute())


def fid(
    generated: list[Image.Image], reference: list[Image.Image], feature: int | nn.Module = 2048, **options
) -> float:
    """`feature` is the Inception feature width (torch-fidelity's network), or a module of one's own."""
    try:
        metric = FrechetInceptionDistance(feature=feature, sync_on_compute=False, **options)  # images gathered
    except (ModuleNotFoundError, OSError) as error:  # torch-fidelity missing, or its weights file
        raise UserError(
            f"FID: {str(error).splitlines()[0]} (pip install torch-fidelity; --inception-weights)"
        ) from None
    size = min(image.width for image in generated)
    metric.update(as_uint8(reference, size), real=True)
    metric.update(as_uint8(generated, size), real=False)
    return float(metric.compute())


def read_images(folder: Path) -> list[Image.Image]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise UserError(f"--reference-dir {folder}: needs at least 2 images, found {len(files)}")
    return [read_image(path, f"--reference-dir {path}") for path in files]
