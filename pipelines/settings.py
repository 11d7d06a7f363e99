"""One generation run's settings, declared once: what a person asks (GenerationConfig, None where
the pipeline or the model decides), and what each image comes out with (Generated, carrying the
resolved settings its PNG records).

Each field of GenerationConfig carries a `Setting`: its help, its sample.py flag, its bounds, whether
our PNG chunk records it, its key in A1111's infotext and its field in A1111's API. sample.py's flags,
the checks, the PNG text, the infotext writer and reader and the server's requests are all read
from there: a new setting is one field here. This module stays free of torch, so that sample.py
builds its flags and checks them before the libraries load.
"""

import math
from collections.abc import Iterator
from dataclasses import Field, dataclass, field, fields
from typing import TYPE_CHECKING, Any, get_args

from PIL import Image

from ldm.errors import UserError
from pipelines.choices import EMPHASIS_MODES, HIRES_UPSCALERS, SCHEDULERS, SIZE_CONDITIONING, WEBUI_EMPHASIS

if TYPE_CHECKING:
    from torch import Tensor

MAX_SEED = 2**32 - 1  # A1111 draws and writes seeds in 0..2**32-1
DEFAULT_SWITCH = 0.8  # an SDXL refiner takes over for the last 20% of the noise schedule


class GenerationError(UserError):
    """A request the pipeline cannot carry out (bad size, strength, missing image); one line."""


@dataclass(frozen=True)
class Setting:
    """How one setting is asked for, checked and recorded."""

    help: str
    flag: str | None = ""  # sample.py's --flag: "" for the field's name with dashes, None for none
    metavar: str | tuple[str, ...] | None = None
    group: str = ""  # the --help section ("SDXL"); "" for the main one
    choices: tuple[str, ...] = ()
    low: float | None = None  # the bounds, inclusive unless `open`; every float must also be finite
    high: float | None = None
    open: bool = False  # the bounds themselves are outside
    valid: str = ""  # what the error says is valid, where the bounds alone do not say it
    png: bool = True  # our PNG text records it (and --from-png reads it back)
    infotext: str | None = None  # its key in A1111's `parameters` text
    webui: dict[str, str] | None = None  # our value -> A1111's, where the names differ
    api: str | None = None  # its field in A1111's /sdapi/v1/txt2img request


def setting(default: Any, help: str, **declared: Any) -> Any:
    """A GenerationConfig field with its Setting."""
    return field(default=default, metadata={"setting": Setting(help, **declared)})


def declared() -> Iterator[tuple[Field, Setting]]:
    """GenerationConfig's fields with their Settings, in order."""
    for item in fields(GenerationConfig):
        yield item, item.metadata["setting"]


def value_type(item: Field) -> type:
    """A field's type without its None: int, float, str, bool or tuple (SDXL's sizes)."""
    types = [t for t in get_args(item.type) or (item.type,) if t is not type(None)]
    return getattr(types[0], "__origin__", types[0])


def to_text(value: Any) -> str:
    """A value as our PNG text records it: SDXL's sizes as "H,W"."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def from_text(item: Field, text: str) -> Any:
    """A field's value back from its PNG text (ValueError if it is not one)."""
    kind = value_type(item)
    return tuple(int(v) for v in text.split(",")) if kind is tuple else kind(text)


class SettingError(GenerationError):
    """One setting out of its bounds: `name=value: what is valid`."""


SDXL = "SDXL: second prompts, size conditioning (default: the output size, crop 0 0)"
HIRES = "hires fix: draw, upscale, then draw again at the larger size from the upscaled picture"
SAMPLERS = {name: sampler.webui_name for name, sampler in SCHEDULERS.items()}
SEEDS = f"use a seed of 0 to {MAX_SEED}, as A1111 writes them, or -1 for a random one"


def _sizes(default_help: str, metavar: tuple[str, str], low: int) -> Any:
    return setting(None, default_help, metavar=metavar, group=SDXL, low=low)


@dataclass(frozen=True)
class GenerationConfig:
    """One run's settings: as asked (None where the pipeline or the model decides), then resolved by
    the pipeline into the same class with every value known. Each result carries the resolved one,
    and the PNG metadata reads it. Made, it has passed every check that needs no model."""

    negative_prompt: str = setting("", "what to steer away from", api="negative_prompt")
    # SDXL: what its second text encoder reads instead of each prompt, and of the negative prompt
    # (diffusers' names); None: the same text as the first encoder.
    prompt_2: str | None = setting(None, "what the second text encoder reads (default: the prompt)", group=SDXL)
    negative_prompt_2: str | None = setting(None, "the same for the negative prompt", group=SDXL)
    num_images: int = setting(1, "images per prompt", metavar="N", low=1, png=False)
    batch_size: int = setting(1, "images generated at once", metavar="B", low=1, png=False, api="batch_size")
    steps: int | None = setting(
        None, "default: the model's sampling.json, else 30", low=1, infotext="Steps", api="steps"
    )
    scheduler: str | None = setting(
        None,
        f"{', '.join(SCHEDULERS)} (default: the model's own; lcm is for LCM-distilled models)",
        metavar="NAME",
        choices=tuple(SCHEDULERS),
        infotext="Sampler",
        webui=SAMPLERS,
    )
    guidance_scale: float | None = setting(
        None, "default: the model's sampling.json, else 7.5", infotext="CFG scale", api="cfg_scale"
    )
    seed: int | None = setting(
        None,
        "image k uses seed+k (default or -1: random, recorded in the PNG)",
        low=-1,
        high=MAX_SEED,
        valid=SEEDS,
        infotext="Seed",
        api="seed",
    )
    height: int | None = setting(None, "default: the init image's, else the model's", infotext="Size", api="height")
    width: int | None = setting(None, "default: the init image's, else the model's", infotext="Size", api="width")
    strength: float | None = setting(  # image-to-image and inpainting only; None there: 0.8
        None,
        "how far to move from the init image, 0..1 (default 0.8)",
        low=0,
        high=1,
        infotext="Denoising strength",
        api="denoising_strength",
    )
    emphasis: str = setting(
        "original",
        "how (word:1.2) weights apply (default: original)",
        choices=EMPHASIS_MODES,
        infotext="Emphasis",
        webui=WEBUI_EMPHASIS,
    )
    attention_maps: bool = setting(False, "write a heatmap per prompt token", png=False)
    # Attend-and-Excite (pipelines/attend.py): the latents steered so that each named word gets its place
    attend: str | None = setting(
        None,
        "Attend-and-Excite on these words, comma-separated (or token numbers), or auto: each 'a COLOR SHAPE' "
        "of a prompt naming two or more",
        metavar="WORDS",
        infotext="Attend",
    )
    # one chunk per prompt, with a warning, instead of chunking
    truncate: bool = setting(False, "cut prompts at 75 tokens instead of chunking", flag="truncate-prompts", png=False)
    # SDXL's size conditioning, each (height, width); None: the output size, (0, 0), the output size.
    # The negative ones condition the unguided prediction; as in diffusers, the two negative sizes come
    # together (the crop then defaults to (0, 0)), and without them the negative ones are the positive ones.
    original_size: tuple[int, int] | None = _sizes("the size the model is told the image had", ("H", "W"), 1)
    crop_top_left: tuple[int, int] | None = _sizes("the crop it is told the image had", ("TOP", "LEFT"), 0)
    target_size: tuple[int, int] | None = _sizes("the size it is told to draw", ("H", "W"), 1)
    negative_original_size: tuple[int, int] | None = _sizes("the same, for the negative side", ("H", "W"), 1)
    negative_crop_top_left: tuple[int, int] | None = _sizes("the same, for the negative side", ("TOP", "LEFT"), 0)
    negative_target_size: tuple[int, int] | None = _sizes("the same, for the negative side", ("H", "W"), 1)
    # With a refiner: the fraction of the noise schedule the base runs before the refiner takes over
    # (diffusers' denoising_end / denoising_start); None there: DEFAULT_SWITCH.
    refiner_switch: float | None = setting(
        None,
        f"the noise schedule's fraction the base runs ({DEFAULT_SWITCH})",
        group=SDXL,
        low=0,
        high=1,
        open=True,
        valid="the fraction of the noise schedule the base runs, in (0, 1)",
        infotext="Refiner switch at",
    )
    # Hires fix (pipelines/hires.py); the other three need hires_scale. None there: latent, the first
    # pass's steps, 0.7.
    hires_scale: float | None = setting(
        None, "upscale by this factor (e.g. 2)", metavar="X", group=HIRES, low=1, high=8, infotext="Hires upscale"
    )
    hires_steps: int | None = setting(
        None, "the second pass's steps (default: the first pass's)", metavar="N", group=HIRES, low=1,
        infotext="Hires steps",
    )  # fmt: skip
    hires_upscaler: str | None = setting(
        None,
        "latent (default) or lanczos",
        group=HIRES,
        choices=tuple(HIRES_UPSCALERS),
        infotext="Hires upscaler",
        webui=HIRES_UPSCALERS,
    )
    hires_denoise: float | None = setting(
        None, "the second pass's strength, 0..1 (default 0.7)", metavar="X", group=HIRES, low=0, high=1,
        infotext="Denoising strength",
    )  # fmt: skip
    progress: bool = setting(True, "a progress bar", flag=None, png=False)

    def __post_init__(self) -> None:
        for item, declaration in declared():
            value = getattr(self, item.name)
            if isinstance(value, list):  # SDXL's sizes from a command line, a PNG or JSON
                value = tuple(value)
                object.__setattr__(self, item.name, value)
            if value_type(item) is float and type(value) is int:  # 2 and 2.0: one setting, one text
                value = float(value)
                object.__setattr__(self, item.name, value)
            check(item, declaration, value)
        if self.seed == -1:  # A1111's "random"
            object.__setattr__(self, "seed", None)
        last_seed = (self.seed or 0) + self.num_images - 1
        if self.seed is not None and last_seed > MAX_SEED:
            raise SettingError(
                f"seed={self.seed}: with {self.num_images} image(s) the seeds run to {last_seed}; {SEEDS}"
            )


KINDS = {int: "a whole number", float: "a number", str: "text", bool: "true or false", tuple: "(height, width)"}


def check(item: Field, declaration: Setting, value: Any) -> None:
    """One value against its field's type and its Setting's bounds and choices."""
    name, kind = item.name, value_type(item)
    if value is None:
        return
    right_type = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        right_type = True
    if kind is tuple:
        right_type = isinstance(value, tuple) and len(value) == 2 and all(type(v) is int for v in value)
    if not right_type:
        raise SettingError(f"{name}={value!r}: must be {KINDS[kind]}")
    if kind is float and not math.isfinite(value):
        raise SettingError(f"{name}={value}: must be a finite number")
    if declaration.choices and value not in declaration.choices:
        raise SettingError(f"{name}={value!r}: use one of {', '.join(declaration.choices)}")
    low, high = declaration.low, declaration.high
    smallest, largest = (min(value), max(value)) if kind is tuple else (value, value)
    below = low is not None and (smallest <= low if declaration.open else smallest < low)
    above = high is not None and (largest >= high if declaration.open else largest > high)
    if below or above:
        valid = declaration.valid or (f"must be {low} to {high}" if high is not None else f"must be at least {low}")
        raise SettingError(f"{name}={value}: {valid}")


@dataclass
class Generated:
    image: Image.Image
    prompt: str
    seed: int
    config: GenerationConfig  # the run's settings, resolved: what the PNG metadata records
    attention_maps: list[tuple[str, "Tensor"]] = field(default_factory=list)  # (token, (H, W) map in [0, 1])


def size_conditioning(config: GenerationConfig, sdxl: bool, height: int, width: int) -> dict:
    """SDXL's six sizes, resolved (diffusers' defaults); other models refuse them and a second prompt."""
    names = SIZE_CONDITIONING[:3]
    given = [name for name in SIZE_CONDITIONING if getattr(config, name) is not None]
    if not sdxl:
        if given:
            raise GenerationError(f"{', '.join(given)}: only SDXL models take size conditioning")
        if config.prompt_2 is not None or config.negative_prompt_2 is not None:
            raise GenerationError("prompt_2, negative_prompt_2: only SDXL models have a second text encoder")
        return {}
    positive = {
        "original_size": config.original_size or (height, width),
        "crop_top_left": config.crop_top_left or (0, 0),
        "target_size": config.target_size or (height, width),
    }
    if (config.negative_original_size is None) != (config.negative_target_size is None):
        raise GenerationError("negative_original_size and negative_target_size go together, as in diffusers")
    if config.negative_original_size is None:  # diffusers: then the negative ids are the positive ones
        return positive | {f"negative_{n}": positive[n] for n in names}
    return positive | {
        "negative_original_size": config.negative_original_size,
        "negative_crop_top_left": config.negative_crop_top_left or (0, 0),
        "negative_target_size": config.negative_target_size,
    }


def refiner_switch(config: GenerationConfig, refiner: bool, init_image: bool) -> float | None:
    """The refiner's switch, checked against the run; None without a refiner."""
    if not refiner:
        if config.refiner_switch is not None:
            raise GenerationError("refiner_switch: there is no refiner to switch to")
        return None
    if init_image or config.attention_maps:
        raise GenerationError("a refiner runs with text-to-image only: not with an init image or attention maps")
    return DEFAULT_SWITCH if config.refiner_switch is None else config.refiner_switch
