"""Writing a run to disk: numbered PNGs that carry their parameters, a grid, attention overlays.

Files are numbered after the highest number already in the folder and opened exclusively, so
sorting names gives generation order and nothing is ever overwritten.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from pipelines.schedulers import SCHEDULERS
from pipelines.text_to_image import Generated

_NUMBERED = re.compile(r"^(\d{5})-")


@dataclass
class RunSettings:
    """What a PNG records besides its own prompt and seed."""

    model: str
    steps: int
    scheduler: str
    guidance_scale: float
    strength: float | None = None  # image-to-image and inpainting only
    loras: tuple[tuple[str, float], ...] = ()  # (file, scale) merged into the model


def png_info(generated: Generated, settings: RunSettings) -> PngInfo:
    """Text chunks: one per parameter, and `parameters` in the A1111 form other tools read."""
    width, height = generated.image.size
    fields = {
        "prompt": generated.prompt,
        "negative_prompt": generated.negative_prompt,
        "seed": str(generated.seed),
        "steps": str(settings.steps),
        "scheduler": settings.scheduler,
        "guidance_scale": str(settings.guidance_scale),
        "model": settings.model,
        "width": str(width),
        "height": str(height),
    }
    sampler = SCHEDULERS[settings.scheduler].webui_name if settings.scheduler in SCHEDULERS else settings.scheduler
    line = (
        f"Steps: {settings.steps}, Sampler: {sampler}, CFG scale: {settings.guidance_scale}, "
        f"Seed: {generated.seed}, Size: {width}x{height}, Model: {Path(settings.model).name or settings.model}"
    )
    if settings.strength is not None:
        fields["strength"] = str(settings.strength)
        line += f", Denoising strength: {settings.strength}"
    if settings.loras:
        fields["lora"] = ", ".join(f"{path}:{scale}" for path, scale in settings.loras)
        line += ", Lora: " + ", ".join(f"{Path(path).stem}:{scale}" for path, scale in settings.loras)
    fields["parameters"] = f"{generated.prompt}\nNegative prompt: {generated.negative_prompt}\n{line}"
    info = PngInfo()
    for key, value in fields.items():
        info.add_itxt(key, value)  # international text: any Unicode prompt
    return info


def next_number(outdir: Path) -> int:
    """One past the highest 5-digit prefix in the folder (0 for a new folder)."""
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def save_png(image: Image.Image, path: Path, info: PngInfo | None = None) -> None:
    with path.open("xb") as file:  # "x": fail rather than overwrite
        image.save(file, format="PNG", pnginfo=info)


def grid(images: list[Image.Image]) -> Image.Image:
    """Images in rows of at most ceil(sqrt(n)), in order."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


def overlay(image: Image.Image, heatmap: Tensor, opacity: float = 0.6) -> Image.Image:
    """The heatmap (values in [0, 1]) as colour over a grey copy of the image."""
    colours = np.array([[0, 0, 0], [90, 0, 160], [220, 40, 80], [255, 160, 0], [255, 255, 180]], dtype=np.float32)
    values = heatmap.numpy() * (len(colours) - 1)
    low = np.clip(np.floor(values).astype(int), 0, len(colours) - 2)
    fraction = (values - low)[..., None]
    coloured = colours[low] * (1 - fraction) + colours[low + 1] * fraction  # a black-purple-orange-white ramp
    grey = np.asarray(image.convert("L").convert("RGB"), dtype=np.float32)
    return Image.fromarray((grey * (1 - opacity) + coloured * opacity).astype(np.uint8))


def write_run(outdir: Path, run: list[Generated], settings: RunSettings) -> list[Path]:
    """Write every image (and its attention overlays), then a grid of the run; return the paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    number = next_number(outdir)
    written = []
    for offset, generated in enumerate(run):
        stem = f"{number + offset:05d}-{generated.seed}"
        written.append(outdir / f"{stem}.png")
        save_png(generated.image, written[-1], png_info(generated, settings))
        for i, (token, heatmap) in enumerate(generated.attention_maps):
            name = re.sub(r"[^0-9A-Za-z]+", "_", token).strip("_") or "symbol"
            written.append(outdir / f"{stem}-attention-{i:02d}-{name}.png")
            save_png(overlay(generated.image, heatmap), written[-1])
    if len(run) > 1:
        written.append(outdir / f"{number:05d}-{number + len(run) - 1:05d}-grid.png")
        save_png(grid([g.image for g in run]), written[-1])
    return written
