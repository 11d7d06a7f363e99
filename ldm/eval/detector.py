"""A deterministic detector for the shapes dataset: connected components on the black background,
each classified by colour, shape, size and position. No learned model, so its verdicts can be
checked by hand and its accuracy measured on the dataset's own images."""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ldm.data.shapes import COLORS, POSITIONS, SIZES

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
NAMES = list(COLORS)
CELLS = {cell: name for name, cell in POSITIONS.items()}
# A pixel whose brightest channel exceeds half of full intensity is part of a shape: every colour
# is drawn at 255 in some channel, and a blurred edge crosses half its height where the true edge
# lies, so decoded images, which are never crisp, keep their corners (at 80, renders blurred by one
# pixel were read right 90.7% of the time, the misses mostly small squares taken for circles).
FOREGROUND = 128
MIN_AREA = 0.005  # components smaller than this fraction of the image are specks, not shapes


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    size: str
    position: str
    area: int  # pixels
    mask: np.ndarray  # (H, W) bool


def detect(image: np.ndarray) -> list[Detection]:
    """Shapes in an (H, W, 3) uint8 image, largest first."""
    height, width, _ = image.shape
    foreground = image.max(axis=2) > FOREGROUND
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3)))
    found = []
    for label in range(1, count + 1):
        mask = labels == label
        area = int(mask.sum())
        if area < MIN_AREA * height * width:
            continue
        found.append(classify(image, mask, area))
    return sorted(found, key=lambda d: -d.area)


def classify(image: np.ndarray, mask: np.ndarray, area: int) -> Detection:
    height, width = mask.shape
    rows, columns = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, columns.min(), columns.max() + 1
    mean = image[mask].astype(np.float32).mean(axis=0)
    color = NAMES[int(np.argmin(((PALETTE - mean) ** 2).sum(axis=1)))]
    span = max(bottom - top, right - left) / max(height, width)
    size = "large" if span > (SIZES["small"] + SIZES["large"]) / 2 else "small"
    cell = (min(int((left + right) / 2 / width * 3), 2), min(int((top + bottom) / 2 / height * 3), 2))
    return Detection(color, shape_of(mask[top:bottom, left:right]), size, CELLS[cell], area, mask)


def shape_of(box: np.ndarray) -> str:
    """A square fills its bounding box; a triangle (apex up) has most of its pixels in the lower
    half of the box; a circle fills π/4 of its box, evenly top and bottom."""
    fill = box.mean()
    lower = box[box.shape[0] // 2 :].sum() / max(box.sum(), 1)
    if fill > 0.9:
        return "square"
    if lower > 0.62 or fill < 0.62:
        return "triangle"
    return "circle"
