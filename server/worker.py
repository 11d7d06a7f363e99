"""The server's one worker: it draws one request at a time on the model the request names (loaded
once and kept until another model or set of LoRAs is asked for), writes every image to the outputs
folder as sample.py does (numbered PNGs with their settings, a manifest line each), and reports its
progress to /progress. A request arriving while `queue` others wait is turned away (503), and an
interrupt stops the run after the current step, keeping the images already finished."""

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ldm.autoencoder import latents_to_images
from ldm.controlnet import ControlNet
from ldm.errors import UserError
from ldm.model import dtype_name
from pipelines.control import Control, preprocess
from pipelines.jobs import plan
from pipelines.model_files import model_hash
from pipelines.outputs import ControlRecord, RunSettings, RunWriter
from pipelines.pictures import tensor_to_image
from pipelines.prompts import encoder_widths
from pipelines.settings import Generated, GenerationConfig
from pipelines.text_to_image import TextToImagePipeline
from server.a1111 import ControlRequest
from server.folders import Entry
from server.limits import Limits


class Busy(Exception):
    """Too many requests waiting: the client should try again later (503)."""


class Interrupted(Exception):
    """Raised from the step callback when /interrupt was called."""


@dataclass(frozen=True)
class Order:
    """One request, translated: what to draw, on which model, with which LoRAs."""

    prompt: str
    config: GenerationConfig
    checkpoint: Entry
    loras: tuple[tuple[Entry, float], ...] = ()
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    controls: tuple[tuple[Entry, ControlRequest], ...] = ()  # each ControlNet and its unit


@dataclass
class Drawn:
    """A request's images, written: each result with its file, and the run's resolved settings."""

    config: GenerationConfig
    images: list[tuple[Generated, Path]]
    settings: RunSettings


@dataclass
class Progress:
    """What /progress reports: images done of the request's, and the step of the current batch."""

    job_count: int = 0
    job_no: int = 0
    step: int = 0
    steps: int = 0
    started: float = 0.0
    job_timestamp: str = ""
    interrupted: bool = False
    latents: Tensor | None = field(default=None, repr=False)  # the current batch's, for the preview


class Worker:
    def __init__(self, outdir: Path, device: str, dtype: str, queue: int, limits: Limits,
                 embeddings: Path | None = None):  # fmt: skip
        self.outdir, self.device, self.dtype, self.queue, self.limits = outdir, device, dtype, queue, limits
        self.embeddings = embeddings  # textual-inversion embeddings, listed afresh for every request
        self.progress = Progress()
        self._lock, self._counting = threading.Lock(), threading.Lock()
        self._waiting = 0
        self._pipe: TextToImagePipeline | None = None
        self._loaded: tuple | None = None  # (model path, LoRA paths and scales) of self._pipe
        self._controlnets: dict[tuple[Path, Path], ControlNet] = {}

    def draw(self, order: Order) -> Drawn:
        """The order's images, drawn and written; Busy when `queue` requests already wait."""
        with self._counting:
            if self._waiting > self.queue:
                raise Busy(f"{self._waiting} requests are waiting; try again later")
            self._waiting += 1
        try:
            with self._lock:
                return self._draw(order)
        finally:
            with self._counting:
                self._waiting -= 1

    def interrupt(self) -> None:
        self.progress.interrupted = True

    def preview(self) -> Image.Image | None:
        """The current batch's first image as it stands, decoded from the last step's latents."""
        latents, pipe = self.progress.latents, self._pipe
        if latents is None or pipe is None:
            return None
        vae = pipe.model.vae
        with torch.no_grad():
            return tensor_to_image(latents_to_images(vae, latents[:1].to(vae.dtype)).float()[0])

    def _draw(self, order: Order) -> Drawn:
        pipe = self._pipeline(order.checkpoint, order.loras)
        if self.embeddings is not None:
            pipe.load_embeddings(self.embeddings)
        control = [
            Control(
                self._controlnet(entry, pipe), preprocess(unit.image, unit.module), unit.weight, unit.start, unit.end
            )
            for entry, unit in order.controls
        ]
        config, _ = pipe.resolve(order.config, order.init_image, order.mask, control)
        self.limits.check(config, len(control))  # the model's default size, now filled in, and its hires pass
        loras = tuple((str(entry.path), scale) for entry, scale in order.loras)
        path = order.checkpoint.path
        units = tuple(
            ControlRecord(str(entry.path), unit.weight, unit.start, unit.end, unit.module, self.short_hash(entry.path))
            for entry, unit in order.controls
        )
        lora_hashes = tuple(model_hash(entry.path) for entry, _ in order.loras)
        settings = RunSettings(str(path), model_hash(path), loras, lora_hashes=lora_hashes, ti_hashes=pipe.ti_hashes,
                               controls=units, dtype=dtype_name(pipe.dtype))  # fmt: skip
        writer = RunWriter(self.outdir, settings, config)
        jobs = plan([order.prompt], config.num_images, config.seed)
        writer.reserve(jobs, {})
        self.progress = Progress(len(jobs), started=time.time(), job_timestamp=time.strftime("%Y%m%d%H%M%S"))
        drawn = Drawn(config, [], settings)
        try:
            options = asdict(config) | {"progress": False}
            results = pipe.generate_each(
                order.prompt, order.init_image, order.mask, on_step=self._step, control=control, **options
            )
            for job, generated in zip(jobs, results, strict=False):
                drawn.images.append((generated, writer.write(generated, job)))
                self.progress.job_no += 1
        except Interrupted:
            pass  # the images finished so far are written and returned, as A1111 returns them
        finally:
            writer.release()  # the numbers of images not drawn (interrupted, or failed)
            self.progress = Progress()  # idle, as A1111's state.end()
        return drawn

    def _step(self, step: int, steps: int, latents: Tensor) -> None:
        if self.progress.interrupted:
            raise Interrupted
        self.progress.step, self.progress.steps, self.progress.latents = step, steps, latents

    def text_widths(self, checkpoint: Entry) -> list[int]:
        """The model's text encoders' widths (what an embedding must match), loading it if no model is."""
        with self._lock:
            if self._pipe is None or self._loaded[0] != checkpoint.path:
                self._pipeline(checkpoint, ())
            return encoder_widths(self._pipe.model.text_encoders())

    def _pipeline(self, checkpoint: Entry, loras: tuple[tuple[Entry, float], ...]) -> TextToImagePipeline:
        """The model with its LoRAs merged: the loaded one, or loaded afresh (LoRAs merge into the
        weights, so another set of LoRAs reloads the model)."""
        wanted = (checkpoint.path, tuple((entry.path, scale) for entry, scale in loras))
        if self._loaded != wanted:
            self._pipe, self._loaded = None, None  # the old one's memory goes before the new one loads
            try:
                pipe = TextToImagePipeline.from_pretrained(checkpoint.path, device=self.device, dtype=self.dtype)
                for entry, scale in loras:
                    pipe.load_lora(entry.path, scale)
            except (OSError, ValueError) as error:
                raise UserError(f"{checkpoint.title}: cannot load it ({error})") from None
            self._pipe, self._loaded = pipe, wanted
        return self._pipe

    def _controlnet(self, entry: Entry, pipe: TextToImagePipeline) -> ControlNet:
        """A ControlNet, loaded once per model (an original file is read for the model's UNet)."""
        key = (entry.path, self._loaded[0])
        if key not in self._controlnets:
            self._controlnets[key] = pipe.load_controlnet(entry.path)
        return self._controlnets[key]

    def short_hash(self, path: Path) -> str | None:
        """A ControlNet's 8-digit hash, as sd-webui-controlnet shows it."""
        return model_hash(path, 8)
