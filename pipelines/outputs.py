"""Writing a run to disk: numbered PNGs that carry their parameters, attention overlays, a grid.

Each image is written the moment it is done, so an interrupted run keeps every finished image.
A run reserves its numbers before it draws (pipelines/numbering.py: runs started together into one
folder take distinct numbers), image k under first + k whichever process draws it, the grid the
number after the last; a file appears under its name only once complete (written beside it, then
linked into place), and never replaces another. `manifest.jsonl` gets a line per image (file,
index in the run, settings), which is how a rerun with --skip-existing knows what is drawn.
"""

import contextlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from ldm.files import DiskFull, OutputExists, is_disk_full, writing
from pipelines.infotext import format_infotext, infotext_pairs, infotext_unit
from pipelines.jobs import Job
from pipelines.model_files import model_name
from pipelines.numbering import number_of, release, reserve, take
from pipelines.settings import Generated, GenerationConfig, declared, to_text

MANIFEST = "manifest.jsonl"  # a line per image written into the folder: its file, index in the run, settings


class ControlRecord(NamedTuple):
    """What a PNG records of one ControlNet unit (the control image itself is not recorded)."""

    path: str  # its folder or file
    scale: float
    start: float
    end: float
    preprocess: str
    hash: str | None  # of its weights, 8 hex digits as sd-webui-controlnet shows them


@dataclass(frozen=True)
class RunSettings:
    """What a PNG records besides the pipeline's own settings (which each result carries)."""

    model: str
    model_hash: str | None = None  # A1111's short hash: the first 10 hex digits of the weights' SHA-256
    loras: tuple[tuple[str, float], ...] = ()  # (file, scale) merged into the model
    refiner: str | None = None  # SDXL: the refiner's folder or hub id
    refiner_hash: str | None = None
    lora_hashes: tuple[str | None, ...] = ()  # each LoRA file's short hash, in order
    # (prompt, config) -> A1111's "TI hashes" value for that image: the pipeline's ti_hashes
    ti_hashes: Callable[[str, GenerationConfig], str | None] | None = None
    controls: tuple[ControlRecord, ...] = ()  # the ControlNet units
    dtype: str | None = None  # the precision drawn in (bf16 or fp32 on CPUs, by their instructions)


def png_fields(prompt: str, seed: int, config: GenerationConfig, settings: RunSettings) -> dict[str, str]:
    """An image's text chunks: one per recorded setting (what --from-png reads), and `parameters` in
    the A1111 form. `config` is resolved: it knows the size."""
    config = replace(config, seed=seed)  # the image's own
    fields = {"prompt": prompt, "model": model_name(settings.model)}
    for item, declaration in declared():
        if declaration.png and getattr(config, item.name) is not None:
            fields[item.name] = to_text(getattr(config, item.name))
    if settings.model_hash:
        fields["model_hash"] = settings.model_hash
    if settings.dtype:
        fields["dtype"] = settings.dtype
    if settings.loras:  # by name and hash, as the model: no path
        fields["lora"] = "\n".join(f"{Path(path).name}:{scale}" for path, scale in settings.loras)
    if settings.lora_hashes:
        hashes = zip(settings.loras, settings.lora_hashes, strict=True)
        fields["lora_hashes"] = "\n".join(f"{Path(path).name}:{digest}" for (path, _), digest in hashes)
    if settings.refiner:
        fields["refiner"] = model_name(settings.refiner)
    if settings.refiner_hash:
        fields["refiner_hash"] = settings.refiner_hash
    if settings.controls:
        units = [{"name": Path(unit.path).name} | unit._asdict() for unit in settings.controls]
        for unit in units:
            del unit["path"]  # by name and hash, as the model
        fields["controlnet"] = json.dumps(units)  # what --from-png reads back
    settings_pairs = infotext_pairs(config)
    if not _emphasised(prompt, config):
        settings_pairs.pop("Emphasis", None)
    size = list(settings_pairs).index("Size") + 1  # A1111 names the model right after the size
    refiner = settings.refiner and Path(settings.refiner).name
    # A1111's create_infotext (modules/processing.py, 9a224a5c): its own keys to Model, then
    # Denoising strength, then the extras in the order they are added: the hires fix's (at init),
    # the text encoder's (TI hashes, then Emphasis), the LoRAs', the refiner's.
    pairs = dict(list(settings_pairs.items())[:size]) | {
        "Model hash": settings.model_hash,
        "Model": Path(settings.model).name or settings.model,  # as A1111: no path (a hub id's last part)
        "Denoising strength": settings_pairs.pop("Denoising strength", None),
    }
    switch = settings_pairs.pop("Refiner switch at", None)
    emphasis = settings_pairs.pop("Emphasis", None)
    pairs |= dict(list(settings_pairs.items())[size:]) | {
        "TI hashes": settings.ti_hashes(prompt, config) if settings.ti_hashes else None,
        "Emphasis": emphasis,
        **{
            f"ControlNet {k}": infotext_unit(
                unit.preprocess, f"{Path(unit.path).name} [{unit.hash}]", unit.scale, unit.start, unit.end
            )
            for k, unit in enumerate(settings.controls)
        },  # fmt: skip
        "Lora": ", ".join(f"{Path(path).stem}:{scale}" for path, scale in settings.loras) or None,
        # A1111's refiner fields (modules/processing_scripts/refiner.py); A1111 switches after that
        # fraction of the steps, diffusers and we at that fraction of the noise schedule
        "Refiner": f"{refiner} [{settings.refiner_hash}]" if settings.refiner_hash else refiner,
        "Refiner switch at": switch,
    }
    fields["parameters"] = format_infotext(prompt, config.negative_prompt, pairs)
    return fields


def png_info(fields: dict[str, str]) -> PngInfo:
    info = PngInfo()
    for key, value in fields.items():
        info.add_itxt(key, value)  # international text: any Unicode prompt
    return info


def _emphasised(prompt: str, config: GenerationConfig) -> bool:
    """As A1111: the mode is recorded when it is not the default and a prompt has brackets."""
    brackets = any(c in text for text in (prompt, config.negative_prompt) for c in "([")
    return config.emphasis != "original" and brackets


def save_png(image: Image.Image, path: Path, info: PngInfo | None = None) -> None:
    """Write beside the target, then link into place: the name appears only once the file is whole,
    and an existing file is never replaced (OutputExists)."""
    with writing(path) as partial:
        image.save(partial, format="PNG", pnginfo=info)


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Images of one size in rows of `columns` (default ceil(sqrt(n))), in order."""
    columns = columns or math.ceil(math.sqrt(len(images)))
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
    """Writes a run's images as they come, image k under number `first + k` (the name one process and
    N processes give it), with a line per image in the folder's manifest.jsonl, then the run's grid.
    The numbers are reserved first (`reserve`), so a second run writing into the folder at the same
    time takes others: nothing collides, nothing is overwritten, no grid is lost."""

    def __init__(self, outdir: Path, settings: RunSettings, config: GenerationConfig):
        """`config`: the run's settings, resolved (what each image's PNG records)."""
        self.outdir, self.settings, self.config = outdir, settings, config
        self.first = 0
        self.held: set[int] = set()  # numbers reserved for this run whose file is not written yet
        self.owner = False  # this process reserved the numbers (the main one, when several share the run)
        self.made_outdir = False  # the folder is this run's: removed again if the run writes nothing
        self.written = 0  # images this process wrote

    def expected(self, job: Job) -> dict[str, str]:
        """The PNG text chunks (and manifest fields) of a job's image."""
        return png_fields(job.prompt, job.seed, self.config, self.settings)

    def reserve(self, jobs: list[Job], done: dict[int, Path]) -> tuple[int, set[int]]:
        """Reserve the run's numbers (its images', then its grid's): a resumed run's own, those its
        images on file (`done`) were written under, else the folder's next free ones; (first, held).
        Launched as several processes, the main one reserves and the others are told."""
        self.owner, self.made_outdir = True, not self.outdir.exists()
        count = len(jobs) + (len(jobs) > 1)  # the grid's number after the images'
        if not done:
            self.first = reserve(self.outdir, count)
            self.held = set(range(self.first, self.first + count))
            return self.first, self.held
        index, path = next(iter(done.items()))
        self.first = number_of(path.name) - index
        missing = [self.first + k for k in range(count) if k not in done]
        self.held = {number for number in missing if take(self.outdir, number)}  # else free ones, when written
        return self.first, self.held

    def release(self) -> None:
        """Give back the numbers not written (a run stopped early); a folder the run made stays only
        if it holds an image. Only by the process that reserved them."""
        if not self.owner:
            return
        release(self.outdir, self.held)
        self.held = set()
        if self.made_outdir:
            with contextlib.suppress(OSError):
                self.outdir.rmdir()  # only when empty

    def done(self, jobs: list[Job]) -> dict[int, Path]:
        """The jobs whose image is on file: a manifest line with their settings, and the file it names."""
        wanted = {job.index: self.expected(job) for job in jobs}
        found = {}
        for entry in read_manifest(self.outdir):
            index, path = entry.pop("index", None), self.outdir / str(entry.pop("file", ""))
            if wanted.get(index) == entry and path.is_file():
                found[index] = path
        return found

    def write(self, generated: Generated, job: Job) -> Path:
        """The image (with its parameters), its attention overlays, and its manifest line; the
        image's path."""
        fields = png_fields(generated.prompt, generated.seed, generated.config, self.settings)
        number = self._number(self.first + job.index)
        stem = f"{number:05d}-{generated.seed}"
        save_png(generated.image, self.outdir / f"{stem}.png", png_info(fields))
        for i, (token, heatmap) in enumerate(generated.attention_maps):
            name = re.sub(r"[^0-9A-Za-z]+", "_", token).strip("_") or "symbol"
            save_png(overlay(generated.image, heatmap), self.outdir / f"{stem}-attention-{i:02d}-{name}.png")
        append_line(self.outdir / MANIFEST, {"index": job.index, "file": f"{stem}.png", **fields})
        self._written(number)
        self.written += 1
        return self.outdir / f"{stem}.png"

    def finish(self, jobs: list[Job]) -> None:
        """A grid of the run's images, numbered after its last, once all are on file: by whichever
        process draws the last one, once. None for a single image."""
        files = self.done(jobs)
        if len(jobs) < 2 or len(files) < len(jobs):  # one image, or other processes are still drawing
            return
        if (self.outdir / f"{self.first + len(jobs):05d}-grid.png").exists():  # another process of the run, or
            return  # the run before it was resumed, wrote it
        images = []
        for index in sorted(files):
            with Image.open(files[index]) as image:
                images.append(image.convert("RGB"))
        number = self._number(self.first + len(jobs))
        with contextlib.suppress(OutputExists):  # another process of the run wrote it a moment ago
            save_png(grid(images), self.outdir / f"{number:05d}-grid.png")
        self._written(number)

    def _number(self, number: int) -> int:
        """`number` when it is the run's, else (a resumed run whose number another run took while it
        was stopped) the folder's next free one, reserved."""
        if number in self.held:
            return number
        number = reserve(self.outdir, 1)
        self.held.add(number)
        return number

    def _written(self, number: int) -> None:
        release(self.outdir, [number])
        self.held.discard(number)


def read_manifest(outdir: Path) -> list[dict]:
    """The manifest's entries; a line cut short by a kill is passed over."""
    try:
        lines = (outdir / MANIFEST).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [entry for entry in entries if isinstance(entry, dict)]


def recorded_dtype(outdir: Path) -> str | None:
    """The precision the folder's last image was drawn in (as its manifest line records it)."""
    return next((entry["dtype"] for entry in reversed(read_manifest(outdir)) if entry.get("dtype")), None)


def append_line(path: Path, entry: dict) -> None:
    """One JSON line, appended in one write: processes appending at once do not interleave."""
    line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(descriptor, line)
        finally:
            os.close(descriptor)
    except OSError as error:
        if is_disk_full(error):
            raise DiskFull(f"{path}: no space left on the device") from None
        raise
