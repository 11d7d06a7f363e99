"""PIL pictures <-> tensors, as diffusers converts them: what the pipeline starts from and returns."""

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def image_to_tensor(image: Image.Image, width: int, height: int) -> Tensor:
    """PIL RGB -> (1, 3, height, width) in [-1, 1]."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)
    return array.permute(2, 0, 1)[None]


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> Tensor:
    """PIL mask -> (1, 1, height, width) of 0/1: white (>= half) is repainted, black kept."""
    mask = mask.convert("L").resize((width, height), Image.NEAREST)
    return torch.from_numpy((np.asarray(mask) >= 128).astype(np.float32))[None, None]


def tensor_to_image(image: Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB, rounded as diffusers rounds."""
    array = ((image / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)
