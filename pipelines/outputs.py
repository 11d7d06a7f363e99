"""Writing a run to disk: numbered PNGs that carry their parameters, attention overlays, a grid.

Each image is written the moment it is done, so an interrupted run keeps every finished image.
Files are numbered after the highest number already in the folder; a file appears under its name
only once complete (written beside it, then linked into place), and never replaces another. The
grid takes the next number after the run's last image, so sorting names gives generation order.
"""

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from ldm.files import OutputExists, writing
from pipelines.choices import SCHEDULERS, SIZE_CONDITIONING, WEBUI_EMPHASIS
from pipelines.infotext import format_infotext
from pipelines.settings import Generated, GenerationConfig

_NUMBERED = re.compile(r"^(\d{5})-")


@dataclass(frozen=True)
class RunSettings:
    """What a PNG records besides the pipeline's own settings (which each result carries)."""

    model: str
    model_hash: str | None = None  # A1111's short hash: the first 10 hex digits of the weights' SHA-256
    loras: tuple[tuple[str, float], ...] = ()  # (file, scale) merged into the model
    refiner: str | None = None  # SDXL: the refiner's folder or hub id
    refiner_hash: str | None = None


def model_hash(source: str) -> str | None:
    """A1111's short hash of a local model: the single file's SHA-256, or for a diffusers folder its
    UNet weights file's; None for a hub id (no local file named by the user)."""
    path = Path(source)
    weights = path / "unet" / "diffusion_pytorch_model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        return None
    digest = hashlib.sha256()
    with weights.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:10]


def png_info(generated: Generated, settings: RunSettings) -> PngInfo:
    """Text chunks: one per parameter (what --from-png reads), and `parameters` in the A1111 form."""
    config, (width, height) = generated.config, generated.image.size
    fields = {
        "prompt": generated.prompt,
        "negative_prompt": config.negative_prompt,
        "seed": str(generated.seed),
        "steps": str(config.steps),
        "scheduler": config.scheduler,
        "guidance_scale": str(config.guidance_scale),
        "emphasis": config.emphasis,
        "model": settings.model,
        "width": str(width),
        "height": str(height),
    }
    if settings.model_hash:
        fields["model_hash"] = settings.model_hash
    if config.strength is not None:
        fields["strength"] = str(config.strength)
    for name in ("prompt_2", "negative_prompt_2"):
        if getattr(config, name) is not None:
            fields[name] = getattr(config, name)
    for name in SIZE_CONDITIONING:  # SDXL's, resolved; None for other models
        if getattr(config, name) is not None:
            fields[name] = ",".join(map(str, getattr(config, name)))
    if settings.loras:
        fields["lora"] = "\n".join(f"{path}:{scale}" for path, scale in settings.loras)
    if settings.refiner:
        fields |= {"refiner": settings.refiner, "refiner_switch": str(config.refiner_switch)}
    refiner = settings.refiner and Path(settings.refiner).name
    sampler = SCHEDULERS[config.scheduler].webui_name if config.scheduler in SCHEDULERS else config.scheduler
    pairs = {
        "Steps": config.steps,
        "Sampler": sampler,
        "CFG scale": config.guidance_scale,
        "Seed": generated.seed,
        "Size": f"{width}x{height}",
        "Model hash": settings.model_hash,
        "Model": Path(settings.model).name or settings.model,
        "Denoising strength": config.strength,
        "Emphasis": WEBUI_EMPHASIS[config.emphasis] if _emphasised(generated, config) else None,
        "Lora": ", ".join(f"{Path(path).stem}:{scale}" for path, scale in settings.loras) or None,
        # A1111's refiner fields (modules/processing_scripts/refiner.py); A1111 switches after that
        # fraction of the steps, diffusers and we at that fraction of the noise schedule
        "Refiner": f"{refiner} [{settings.refiner_hash}]" if settings.refiner_hash else refiner,
        "Refiner switch at": config.refiner_switch,
    }
    fields["parameters"] = format_infotext(generated.prompt, config.negative_prompt, pairs)
    info = PngInfo()
    for key, value in fields.items():
        info.add_itxt(key, value)  # international text: any Unicode prompt
    return info


def _emphasised(generated: Generated, config: GenerationConfig) -> bool:
    """As A1111: the mode is recorded when it is not the default and a prompt has brackets."""
    brackets = any(c in text for text in (generated.prompt, config.negative_prompt) for c in "([")
    return config.emphasis != "original" and brackets


def next_number(outdir: Path) -> int:
    """One past the highest 5-digit prefix in the folder (0 for a new folder)."""
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def save_png(image: Image.Image, path: Path, info: PngInfo | None = None) -> None:
    """Write beside the target, then link into place: the name appears only once the file is whole,
    and an existing file is never replaced (OutputExists)."""
    with writing(path) as partial:
        image.save(partial, format="PNG", pnginfo=info)


def grid(images: list[Image.Image]) -> Image.Image:
    """Images in rows of at most ceil(sqrt(n)), in order."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


def overlay(image: Image.Image, heatmap: Tensor) -> Image.Image:
    """The heatmap (values in [0, 1]) as colour over a grey copy of the image."""
    colours = np.array([[0, 0, 0], [90, 0, 160], [220, 40, 80], [255, 160, 0], [255, 255, 180]], dtype=np.float32)
    values = heatmap.numpy() * (len(colours) - 1)
    low = np.clip(np.floor(values).astype(int), 0, len(colours) - 2)
    fraction = (values - low)[..., None]
    coloured = colours[low] * (1 - fraction) + colours[low + 1] * fraction  # a black-purple-orange-white ramp
    grey = np.asarray(image.convert("L").convert("RGB"), dtype=np.float32)
    return Image.fromarray((grey * 0.4 + coloured * 0.6).astype(np.uint8))  # 60% heatmap


class RunWriter:
    """Writes a run's images as they come, each under the folder's next free number (so two runs
    writing into one folder interleave and never collide), and its grid."""

    def __init__(self, outdir: Path, settings: RunSettings):
        self.outdir, self.settings = outdir, settings
        self.images: list[Image.Image] = []

    def write(self, generated: Generated) -> None:
        """The image (with its parameters) and its attention overlays."""
        self.outdir.mkdir(parents=True, exist_ok=True)  # made only when there is an image to write
        stem = self._claim(f"-{generated.seed}", generated.image, png_info(generated, self.settings))
        for i, (token, heatmap) in enumerate(generated.attention_maps):
            name = re.sub(r"[^0-9A-Za-z]+", "_", token).strip("_") or "symbol"
            save_png(overlay(generated.image, heatmap), self.outdir / f"{stem}-attention-{i:02d}-{name}.png")
        self.images.append(generated.image)

    def finish(self) -> None:
        """A grid of the run, numbered after its last image; none for a single image."""
        if len(self.images) > 1:
            self._claim("-grid", grid(self.images))

    def _claim(self, suffix: str, image: Image.Image, info: PngInfo | None = None) -> str:
        """Save as NNNNN{suffix}.png under the next free number; returns the stem."""
        for _ in range(100):
            stem = f"{next_number(self.outdir):05d}{suffix}"
            try:
                save_png(image, self.outdir / f"{stem}.png", info)
                return stem
            except OutputExists:  # another run took that number first
                continue
        raise OutputExists(f"{self.outdir}: no free image number after 100 tries")
