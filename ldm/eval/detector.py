"""A deterministic detector for the shapes dataset: connected components on the black background,
each classified by colour, shape, size and position. No learned model, so its verdicts can be
checked by hand and its accuracy measured on the dataset's own images."""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ldm.data.shapes import COLORS, POSITIONS, SIZES, Palette

CELLS = {cell: name for name, cell in POSITIONS.items()}
# A pixel whose brightest channel exceeds half of full intensity is part of a shape: every colour
# is drawn at 255 in some channel, and a blurred edge crosses half its height where the true edge
# lies, so decoded images, which are never crisp, keep their corners (at 80, renders blurred by one
# pixel were read right 90.7% of the time, the misses mostly small squares taken for circles).
FOREGROUND = 128
MIN_AREA = 0.005  # components smaller than this fraction of the image are specks, not shapes
# A shape is hollow (drawn by `make_shapes --outline`) when it covers less than this much of the
# middle of its box (the box's central half along each side). Through the demo VAE's round trip,
# filled shapes cover 0.86 or more of it; 2-pixel outlines, often broken into open rings that
# hole-filling cannot close, cover at most 0.59 in 9 of 10 pictures.
HOLLOW = 0.7


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    size: str
    position: str
    hollow: bool
    area: int  # pixels
    mask: np.ndarray  # (H, W) bool


def detect(image: np.ndarray, palette: Palette = COLORS) -> list[Detection]:
    """Shapes in an (H, W, 3) uint8 image, largest first, each named by its nearest palette colour."""
    height, width, _ = image.shape
    foreground = image.max(axis=2) > FOREGROUND
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3)))
    found = []
    for label in range(1, count + 1):
        mask = labels == label
        area = int(mask.sum())
        if area < MIN_AREA * height * width:
            continue
        found.append(classify(image, mask, area, palette))
    return sorted(found, key=lambda d: -d.area)


def classify(image: np.ndarray, mask: np.ndarray, area: int, palette: Palette = COLORS) -> Detection:
    height, width = mask.shape
    rows, columns = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, columns.min(), columns.max() + 1
    mean = image[mask].astype(np.float32).mean(axis=0)
    distances = ((np.array(list(palette.values()), dtype=np.float32) - mean) ** 2).sum(axis=1)
    color = list(palette)[int(np.argmin(distances))]
    span = max(bottom - top, right - left) / max(height, width)
    size = "large" if span > (SIZES["small"] + SIZES["large"]) / 2 else "small"
    cell = (min(int((left + right) / 2 / width * 3), 2), min(int((top + bottom) / 2 / height * 3), 2))
    clipped = (top == 0, bottom == height, left == 0, right == width)
    box = mask[top:bottom, left:right]
    quarter_h, quarter_w = (bottom - top) // 4, (right - left) // 4
    hollow = bool(box[quarter_h : box.shape[0] - quarter_h, quarter_w : box.shape[1] - quarter_w].mean() < HOLLOW)
    return Detection(color, shape_of(box, clipped), size, CELLS[cell], hollow, area, mask)


def shape_of(box: np.ndarray, clipped: tuple[bool, bool, bool, bool]) -> str:
    """A triangle (apex up) has most of its pixels in the lower half of its bounding box. A square
    fills its box, or, when its corners are soft and its edges wobble a pixel (as decoded small
    squares do, which then fill as little as 0.75 of the box), still reaches √2 times as far from
    its centre along the diagonals as along the axes, where a circle reaches as far: the rule cuts
    that ratio halfway, at 1.2. Rays towards the sides in `clipped` (top, bottom, left, right;
    cut by the image border) are left out. Holes are filled first: shapes are solid."""
    box = ndimage.binary_fill_holes(box)
    fill = box.mean()
    lower = box[box.shape[0] // 2 :].sum() / box.sum()
    if lower > 0.62 or fill < 0.62:
        return "triangle"
    if fill > 0.9 or diagonal_reach_ratio(box, clipped) > 1.2:
        return "square"
    return "circle"


def diagonal_reach_ratio(box: np.ndarray, clipped: tuple[bool, bool, bool, bool]) -> float:
    """Mean reach from the centroid along the diagonals over mean reach along the axes; 1 (no
    evidence of corners) when the border cuts the shape on opposite sides."""
    top, bottom, left, right = clipped
    rows, columns = np.nonzero(box)
    centre = rows.mean(), columns.mean()

    def free(dy: float, dx: float) -> bool:
        return not ((dy < 0 and top) or (dy > 0 and bottom) or (dx < 0 and left) or (dx > 0 and right))

    d = 2**-0.5
    axes = [reach(box, centre, ray) for ray in [(0, 1), (0, -1), (1, 0), (-1, 0)] if free(*ray)]
    diagonals = [reach(box, centre, ray) for ray in [(d, d), (d, -d), (-d, d), (-d, -d)] if free(*ray)]
    if not diagonals:
        return 1.0
    return float(np.mean(diagonals) / max(np.mean(axes), 1e-6))


def reach(box: np.ndarray, centre: tuple[float, float], ray: tuple[float, float]) -> float:
    """Distance in pixels from `centre` to the farthest pixel of the shape along `ray`, in quarter-pixel steps."""
    steps = np.arange(0, sum(box.shape), 0.25)
    rows = np.rint(centre[0] + steps * ray[0]).astype(int)
    columns = np.rint(centre[1] + steps * ray[1]).astype(int)
    inside = (rows >= 0) & (rows < box.shape[0]) & (columns >= 0) & (columns < box.shape[1])
    return float(steps[inside][box[rows[inside], columns[inside]]].max(initial=0.0))
