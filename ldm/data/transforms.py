"""From any image file to a training tensor: RGB, resized by the shorter side, cropped, maybe
flipped, scaled to [-1, 1]. Randomness comes from a generator the caller seeds per item, so a
resumed run sees exactly the crops and flips the uninterrupted run would have. Boxes drawn on
the source image (grounding), loss masks and control images (a ControlNet's) follow the same
resize, crop and flip."""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor


class BadItem(Exception):
    """An item to skip (unreadable, too small, no caption): the message says why."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Every PIL mode to RGB: transparency composited on white, 16/32-bit and float scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class Placement:
    """Where the source image (`original`: width, height) went: scaled by `scale` to `scaled`,
    cropped at (left, top) to width x height, maybe mirrored."""

    width: int
    height: int
    scale: float
    left: int
    top: int
    flip: bool
    original: tuple[int, int]
    scaled: tuple[int, int]

    def size_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's size conditioning for this image: (original height, width, crop top, left, target
        height, width). The crop is counted in the scaled image, as the SDXL paper samples it and
        diffusers' train_text_to_image_sdxl.py records it; a mirrored image's crop is counted from
        its new left edge, as kohya's train_util.py does (diffusers takes `width - left` there)."""
        left = self.scaled[0] - self.left - self.width if self.flip else self.left
        return (self.original[1], self.original[0], self.top, left, self.height, self.width)

    def box(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float] | None:
        """A source-pixel box (x0, y0, x1, y1) as fractions of the training image; None if cropped away."""
        width, height = self.width, self.height
        x0, x1 = (min(max(x * self.scale - self.left, 0), width) / width for x in (box[0], box[2]))
        y0, y1 = (min(max(y * self.scale - self.top, 0), height) / height for y in (box[1], box[3]))
        if x1 <= x0 or y1 <= y0:
            return None
        return (1 - x1, y0, 1 - x0, y1) if self.flip else (x0, y0, x1, y1)


def prepare_image(
    image: Image.Image,
    size: tuple[int, int],
    center_crop: bool,
    random_flip: bool,
    rng: np.random.Generator,
    upscale: bool = False,
) -> tuple[Tensor, Placement]:
    """(3, height, width) in [-1, 1] for size = (width, height), and where the source image went."""
    image = to_rgb(image)
    width, height = image.size
    target_width, target_height = size
    if not upscale and (width < target_width or height < target_height):
        square = target_width == target_height
        wanted = f"resolution {target_width}" if square else f"size {target_width}x{target_height}"
        raise BadItem(f"{width}x{height} is smaller than the training {wanted}")
    scale = max(target_width / width, target_height / height)
    scaled = (max(target_width, round(width * scale)), max(target_height, round(height * scale)))
    spare_x, spare_y = scaled[0] - target_width, scaled[1] - target_height
    if center_crop:
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = int(rng.integers(spare_x + 1)), int(rng.integers(spare_y + 1))
    flip = random_flip and rng.random() < 0.5
    placement = Placement(target_width, target_height, scale, left, top, flip, (width, height), scaled)
    array = np.asarray(place(image, placement), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(array).permute(2, 0, 1), placement


def place(image: Image.Image, placement: Placement, resample: int = Image.BICUBIC) -> Image.Image:
    """The source image resized, cropped and maybe mirrored as `placement` says."""
    left, top = placement.left, placement.top
    image = image.resize(placement.scaled, resample)
    image = image.crop((left, top, left + placement.width, top + placement.height))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if placement.flip else image


def alpha_of(image: Image.Image) -> Image.Image | None:
    """The image's transparency as a grey image (opaque: white), or None if it has none."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return None
    return image.convert("RGBA").getchannel("A")


def prepare_mask(mask: Image.Image | None, placement: Placement) -> Tensor:
    """(1, height, width) in [0, 1]: the mask's grey level placed as the image was (a mask's white
    trains, its black is ignored); all ones for None. Resized by area averaging (PIL's box filter,
    as kohya's cv2.INTER_AREA), which keeps a mask within [0, 1] and its edges where they were."""
    if mask is None:
        return torch.ones(1, placement.height, placement.width)
    if mask.size != placement.original:
        raise BadItem(
            f"the mask is {mask.size[0]}x{mask.size[1]}, the image {placement.original[0]}x{placement.original[1]}"
        )
    array = np.asarray(place(mask.convert("L"), placement, Image.BOX), dtype=np.float32) / 255
    return torch.from_numpy(array)[None]


def prepare_control(control: Image.Image, placement: Placement) -> Tensor:
    """(3, height, width) in [0, 1], what a ControlNet reads: the control image in RGB, stretched to
    its image's size if it has another, then placed as the image was. Bilinear, as diffusers'
    examples/controlnet/train_controlnet.py resizes it; its crop there is a centre crop of its own, here the
    image's crop and flip, so the two stay aligned under random crops, flips and buckets."""
    control = to_rgb(control)
    if control.size != placement.original:
        control = control.resize(placement.original, Image.BILINEAR)
    array = np.asarray(place(control, placement, Image.BILINEAR), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)
