"""A synthetic captioned dataset: one or two coloured shapes on black, with captions from a small grammar.

    python -m commands.make_shapes --out data/shapes --n 5000 --size 64 --seed 0 \
        --leave-out "blue triangle,yellow circle"

Writes NNNNN.png with NNNNN.txt beside it (the folder format train.py reads), and NNNNN.boxes.json
with each shape's box under its colour and shape words (for `diffusion.grounding_loss`). Captions:
`a [small|large] COLOR SHAPE POSITION`, optionally `... and a COLOR SHAPE POSITION`. Item i is
drawn from its own generator seeded by (seed, i), so the first n items do not depend on --n.
`--leave-out` keeps chosen colour-shape pairs out of the data, to test composition on pairs never seen.
`--colors purple=128,0,255` adds colours the demo model never saw (to teach one with a LoRA), and
`--only-colors purple` draws just those.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ldm.errors import UserError

COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "orange": (255, 128, 0),
    "white": (255, 255, 255),
}
Palette = dict[str, tuple[int, int, int]]  # colour word -> RGB
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # name -> (column, row) on a 3x3 grid whose centres are at 1/6, 1/2 and 5/6 of the side
    "in the top left": (0, 0),
    "at the top": (1, 0),
    "in the top right": (2, 0),
    "on the left": (0, 1),
    "in the center": (1, 1),
    "on the right": (2, 1),
    "in the bottom left": (0, 2),
    "at the bottom": (1, 2),
    "in the bottom right": (2, 2),
}
SIZES = {"small": 0.25, "large": 0.5}  # the shape's span as a fraction of the side
JITTER = 0.03  # of the side, each way


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    position: str
    size: str

    def centre(self, side: int, offset: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
        column, row = POSITIONS[self.position]
        return ((2 * column + 1) / 6 + offset[0]) * side, ((2 * row + 1) / 6 + offset[1]) * side


def draw(
    shapes: list[Shape], side: int, rng: np.random.Generator, palette: Palette = COLORS, outline: int = 0
) -> tuple[Image.Image, dict[str, list]]:
    """The picture, and the box (x0, y0, x1, y1 in pixels) of each shape under its colour and shape
    words. With `outline`, shapes are drawn hollow, their edges that many pixels wide."""
    image = Image.new("RGB", (side, side))
    canvas = ImageDraw.Draw(image)
    boxes: dict[str, list] = {}
    for item in shapes:
        x, y = item.centre(side, tuple(rng.uniform(-JITTER, JITTER, 2)))
        r = SIZES[item.size] * side / 2
        for word in (item.color, item.shape):
            boxes.setdefault(word, []).append([round(v, 2) for v in (x - r, y - r, x + r, y + r)])
        paint = {"outline": palette[item.color], "width": outline} if outline else {"fill": palette[item.color]}
        if item.shape == "circle":
            canvas.ellipse([x - r, y - r, x + r, y + r], **paint)
        elif item.shape == "square":
            canvas.rectangle([x - r, y - r, x + r, y + r], **paint)
        else:  # pointing up, its box the same as the square's
            canvas.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], **paint)
    return image, boxes


def layout(shapes: list[Shape], boxes: dict[str, list], side: int, palette: Palette = COLORS) -> Image.Image:
    """The scene's layout, what a layout ControlNet reads: each shape's box filled with its colour,
    on black, in the order the shapes were drawn."""
    image = Image.new("RGB", (side, side))
    canvas = ImageDraw.Draw(image)
    seen: dict[str, int] = {}
    for item in shapes:  # a colour word holds its shapes' boxes in drawing order
        box = boxes[item.color][seen.get(item.color, 0)]
        seen[item.color] = seen.get(item.color, 0) + 1
        canvas.rectangle(box, fill=palette[item.color])
    return image


def caption(shapes: list[Shape]) -> str:
    first = shapes[0]
    text = f"a {first.size} {first.color} {first.shape} {first.position}"
    return text + "".join(f" and a {s.color} {s.shape} {s.position}" for s in shapes[1:])


def sample_scene(
    rng: np.random.Generator,
    left_out: set[tuple[str, str]],
    two_objects: float,
    colors: tuple[str, ...] = tuple(COLORS),
) -> list[Shape]:
    """One object, or two that do not touch: the second is small and at least two cells from a
    large first one (one cell from a small one)."""
    pairs = [(c, s) for c in colors for s in SHAPES if (c, s) not in left_out]
    names = list(POSITIONS)

    def pick(size: str, position: str) -> Shape:
        color, shape = pairs[rng.integers(len(pairs))]
        return Shape(color, shape, position, size)

    first = pick(str(rng.choice(list(SIZES))), names[rng.integers(len(names))])
    if rng.random() >= two_objects:
        return [first]
    gap = 2 if first.size == "large" else 1
    (c0, r0) = POSITIONS[first.position]
    free = [p for p in names if max(abs(POSITIONS[p][0] - c0), abs(POSITIONS[p][1] - r0)) >= gap]
    if not free:  # a large shape in the centre leaves no room
        return [first]
    return [first, pick("small", free[rng.integers(len(free))])]


def parse_pairs(text: str, flag: str = "--leave-out", palette: Palette = COLORS) -> set[tuple[str, str]]:
    """'red circle,blue square' -> {('red', 'circle'), ('blue', 'square')}."""
    pairs = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        words = item.split()
        if len(words) != 2 or words[0] not in palette or words[1] not in SHAPES:
            raise UserError(
                f"{flag} {item!r}: expected 'COLOR SHAPE' with COLOR in {list(palette)}, SHAPE in {list(SHAPES)}"
            )
        pairs.add((words[0], words[1]))
    return pairs


def parse_colors(text: str) -> Palette:
    """'purple=128,0,255,pink=255,128,192' -> the palette with those colours added. A colour must be
    brighter than half in some channel, or the detector would take it for the black background."""
    item = r"([a-z]+|<[a-z]+>)=(\d+,\d+,\d+)"  # a word, or a new one as textual inversion writes it: <rose>
    if not re.fullmatch(rf"{item}(,{item})*", text.strip()):
        raise UserError(f"--colors {text!r}: expected NAME=R,G,B[,NAME=R,G,B...], e.g. purple=128,0,255")
    palette = dict(COLORS)
    for name, rgb in re.findall(item, text):
        values = tuple(int(v) for v in rgb.split(","))
        if max(values) > 255 or max(values) <= 128:
            raise UserError(f"--colors {name}={rgb}: channels 0..255, the brightest above 128")
        palette[name] = values
    return palette


def choose_colors(extra: str | None, only: str | None) -> tuple[Palette, tuple[str, ...]]:
    """The palette (COLORS plus `extra`, as parse_colors reads it) and the colours to draw: `only`
    (comma-separated names), else all of the palette."""
    palette = parse_colors(extra) if extra else COLORS
    colors = tuple(c.strip() for c in only.split(",")) if only else tuple(palette)
    if unknown := [c for c in colors if c not in palette]:
        raise UserError(f"--only-colors {','.join(unknown)}: not in the palette {list(palette)}")
    return palette, colors


def generate(
    out: Path,
    n: int,
    size: int,
    seed: int,
    left_out: set[tuple[str, str]],
    two_objects: float,
    palette: Palette = COLORS,
    colors: tuple[str, ...] = tuple(COLORS),
    outline: int = 0,
    layouts: bool = False,
) -> None:
    """n images of the `colors` (names in `palette`), written as the folder format train.py reads;
    hollow shapes with `outline` (see `draw`); with `layouts`, each image's layout beside it as
    NNNNN_control.png (the control images of a ControlNet's training)."""
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        shapes = sample_scene(rng, left_out, two_objects, colors)
        image, boxes = draw(shapes, size, rng, palette, outline)
        image.save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(caption(shapes) + "\n")
        (out / f"{i:05d}.boxes.json").write_text(json.dumps(boxes) + "\n")
        if layouts:
            layout(shapes, boxes, size, palette).save(out / f"{i:05d}_control.png")
