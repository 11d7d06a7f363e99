"""How faithfully a model trained on the shapes dataset follows the text.

    python -m commands.eval_shapes --model runs/demo-diffusion/model [--seeds 2] [--out eval-out]

Generates a fixed prompt set (every colour x shape x position as a single object, sizes
alternating; two-object prompts; the left-out colour-shape pairs) with several seeds, checks
every image with the deterministic detector, and prints accuracy per attribute, whole-prompt
accuracy, accuracy on left-out pairs, and the cross-attention pointing game: how often the
attention map of the shape word (and of the colour word) peaks inside the object. Writes a
contact sheet of hits and misses and results.json. The command line that draws the images is
commands/eval_shapes.py; this module only judges them.
"""

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from ldm.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, Palette, Shape, caption, draw, layout
from ldm.eval.detector import Detection, detect

DEFAULT_LEFT_OUT = "blue triangle,yellow circle"  # what configs/shapes-*.yaml leave out


@dataclass
class Case:
    """One prompt and what should appear."""

    kind: str  # seen, left-out, two-objects
    shapes: list[Shape]

    @property
    def prompt(self) -> str:
        return caption(self.shapes)


@dataclass
class Verdict:
    case: Case
    seed: int
    image: Image.Image
    attributes: dict[str, bool] = field(default_factory=dict)  # colour, shape, position (and size for one object)
    correct: bool = False
    pointing: dict[str, bool] = field(default_factory=dict)  # shape word, colour word


def prompt_set(
    left_out: set[tuple[str, str]], two_objects: int = 24, colors: tuple[str, ...] = tuple(COLORS)
) -> list[Case]:
    """Every colour x shape x position as one object (sizes alternating), and pairs of objects apart."""
    cases = []
    for i, (color, shape, position) in enumerate(
        (c, s, p) for c in colors for s in SHAPES for p in POSITIONS
    ):  # fmt: skip
        kind = "left-out" if (color, shape) in left_out else "seen"
        cases.append(Case(kind, [Shape(color, shape, position, "small" if i % 2 else "large")]))
    rng = np.random.default_rng(0)
    pairs = [(c, s) for c in colors for s in SHAPES if (c, s) not in left_out]
    names = list(POSITIONS)
    while sum(case.kind == "two-objects" for case in cases) < two_objects:
        (c1, s1), (c2, s2) = (pairs[i] for i in rng.choice(len(pairs), 2, replace=False))
        p1, p2 = (names[i] for i in rng.choice(len(names), 2, replace=False))
        (x1, y1), (x2, y2) = POSITIONS[p1], POSITIONS[p2]
        if max(abs(x1 - x2), abs(y1 - y2)) >= 2:  # as the dataset draws them: apart
            cases.append(Case("two-objects", [Shape(c1, s1, p1, "small"), Shape(c2, s2, p2, "small")]))
    return cases


def scene_layout(case: Case, side: int, seed: int, palette: Palette = COLORS) -> Image.Image:
    """The case's layout, what a layout ControlNet reads: its boxes as the dataset draws them (their
    jitter from `seed`), each filled with its colour, as `make_shapes --layouts` writes them."""
    _, boxes = draw(case.shapes, side, np.random.default_rng(seed), palette)
    return layout(case.shapes, boxes, side, palette)


def judge(
    case: Case, seed: int, image: Image.Image, maps: list[tuple[str, Tensor]], palette: Palette = COLORS
) -> Verdict:
    found = detect(np.asarray(image.convert("RGB")), palette)
    verdict = Verdict(case, seed, image)
    if case.kind == "two-objects":  # each attribute right: two objects found, with it at their places
        for name in ("position", "color", "shape"):
            wanted = {(getattr(s, name), s.position) for s in case.shapes}
            verdict.attributes[name] = len(found) == 2 and {(getattr(d, name), d.position) for d in found} == wanted
        wanted = {(s.color, s.shape, s.position) for s in case.shapes}
        verdict.correct = len(found) == 2 and {(d.color, d.shape, d.position) for d in found} == wanted
        return verdict
    expected = case.shapes[0]
    largest: Detection | None = found[0] if found else None
    verdict.attributes = {
        name: largest is not None and getattr(largest, name) == getattr(expected, name)
        for name in ("color", "shape", "position", "size")
    }
    verdict.correct = len(found) == 1 and all(verdict.attributes.values())
    if largest is not None and maps:
        for role, word in (("shape", expected.shape), ("color", expected.color)):
            heatmap = word_map(maps, word)
            peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            verdict.pointing[role] = bool(largest.mask[peak])
    return verdict


def word_map(maps: list[tuple[str, Tensor]], word: str) -> np.ndarray:
    """A word's attention map: the sum over its tokens (CLIP splits some words, e.g. cyan = cy + an)."""
    tokens = [token for token, _ in maps]
    for start in range(len(tokens)):
        for end in range(start + 1, len(tokens) + 1):
            if "".join(tokens[start:end]) == word:
                return sum(np.asarray(heatmap) for _, heatmap in maps[start:end])
    raise KeyError(f"{word!r} is not among the prompt's tokens {tokens}")


def rate(values: list[bool]) -> float | None:
    """Percent true, to one decimal; None for no values."""
    return round(100 * sum(values) / len(values), 1) if values else None


def summarise(verdicts: list[Verdict]) -> dict:
    seen = [v for v in verdicts if v.case.kind == "seen"]
    left_out = [v for v in verdicts if v.case.kind == "left-out"]
    two = [v for v in verdicts if v.case.kind == "two-objects"]
    singles = seen + left_out
    return {
        "images": len(verdicts),
        "seen": {name: rate([v.attributes[name] for v in seen]) for name in ("color", "shape", "position", "size")}
        | {"whole prompt": rate([v.correct for v in seen])},
        "left-out pairs": {"whole prompt": rate([v.correct for v in left_out])}
        | {name: rate([v.attributes[name] for v in left_out]) for name in ("color", "shape")},
        "two objects": {"whole prompt": rate([v.correct for v in two])}
        | {name: rate([v.attributes[name] for v in two]) for name in ("position", "color", "shape")},
        "pointing game": {role: pointing(singles, role) for role in ("shape", "color")},
        "seen, by size": {size: by_size([v for v in seen if v.case.shapes[0].size == size]) for size in SIZES},
        "single objects, by colour": {
            color: by_colour([v for v in singles if v.case.shapes[0].color == color])
            for color in dict.fromkeys(v.case.shapes[0].color for v in singles)
        },
    }


def by_colour(verdicts: list[Verdict]) -> dict:
    """How a colour fares: drawn in that colour, and the whole prompt right (a taught colour's test)."""
    return {
        "color": rate([v.attributes["color"] for v in verdicts]),
        "whole prompt": rate([v.correct for v in verdicts]),
    }


def pointing(verdicts: list[Verdict], role: str) -> float | None:
    return rate([v.pointing[role] for v in verdicts if role in v.pointing])


def by_size(verdicts: list[Verdict]) -> dict:
    """Where the misses are: a small object spans four latent pixels, a large one eight."""
    return {
        "shape": rate([v.attributes["shape"] for v in verdicts]),
        "whole prompt": rate([v.correct for v in verdicts]),
        "pointing, shape word": pointing(verdicts, "shape"),
        "pointing, color word": pointing(verdicts, "color"),
    }


def contact_sheet(verdicts: list[Verdict], per_row: int = 16, limit: int = 64) -> Image.Image:
    """Misses first (red frame), then hits (green frame), up to `limit` of each kind."""
    misses = [v for v in verdicts if not v.correct][:limit]
    hits = [v for v in verdicts if v.correct][:limit]
    cells = misses + hits
    side = verdicts[0].image.width + 4
    rows = max(1, -(-len(cells) // per_row))
    sheet = Image.new("RGB", (per_row * side, rows * side), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for i, verdict in enumerate(cells):
        x, y = (i % per_row) * side, (i // per_row) * side
        draw.rectangle(
            [x, y, x + side - 1, y + side - 1], outline=(0, 200, 0) if verdict.correct else (220, 0, 0), width=2
        )
        sheet.paste(verdict.image.convert("RGB"), (x + 2, y + 2))
    return sheet


def evaluate(generate, cases: list[Case], rounds: int, palette: Palette = COLORS) -> list[Verdict]:
    """`generate(prompts, round)` -> one (image, attention maps) per prompt, for each round."""
    verdicts = []
    for round_ in range(rounds):
        for case, (image, maps) in zip(cases, generate([c.prompt for c in cases], round_), strict=True):
            verdicts.append(judge(case, round_, image, maps, palette))
    return verdicts
