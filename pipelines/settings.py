"""One generation run's settings: what a person asks (GenerationConfig, None where the pipeline or
the model decides), the checks that refuse a bad request in one line, and what each image comes
out with (Generated, carrying the resolved settings the PNG metadata records)."""

from dataclasses import dataclass, field

from PIL import Image
from torch import Tensor

from ldm.errors import UserError
from pipelines.choices import SIZE_CONDITIONING
from pipelines.refiner import DEFAULT_SWITCH


class GenerationError(UserError):
    """A request the pipeline cannot carry out (bad size, strength, missing image); one line."""


@dataclass(frozen=True)
class GenerationConfig:
    """One run's settings: as asked (None where the pipeline or the model decides), then resolved by
    the pipeline into the same class with every value known. Each result carries the resolved one,
    and the PNG metadata reads it."""

    negative_prompt: str = ""
    # SDXL: what its second text encoder reads instead of each prompt, and of the negative prompt
    # (diffusers' names); None: the same text as the first encoder.
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    num_images: int = 1  # per prompt
    batch_size: int = 1
    steps: int | None = None  # None: the model's sampling.json, else DEFAULT_STEPS
    guidance_scale: float | None = None  # None: the model's sampling.json, else DEFAULT_GUIDANCE
    scheduler: str | None = None  # None: the model's own
    seed: int | None = None  # image k uses seed + k; None: a random one
    height: int | None = None  # None: the init image's size, else the model's
    width: int | None = None
    strength: float | None = None  # image-to-image and inpainting only; None there: DEFAULT_STRENGTH
    attention_maps: bool = False
    truncate: bool = False  # one chunk per prompt, with a warning, instead of chunking
    emphasis: str = "original"  # how (word:1.2) weights apply: one of pipelines.prompts.EMPHASIS_MODES
    # SDXL's size conditioning, each (height, width); None: the output size, (0, 0), the output size.
    # The negative ones condition the unguided prediction; as in diffusers, the two negative sizes come
    # together (the crop then defaults to (0, 0)), and without them the negative ones are the positive ones.
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crop_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    # With a refiner: the fraction of the noise schedule the base runs before the refiner takes over
    # (diffusers' denoising_end / denoising_start); None there: DEFAULT_SWITCH.
    refiner_switch: float | None = None
    progress: bool = True


@dataclass
class Generated:
    image: Image.Image
    prompt: str
    seed: int
    config: GenerationConfig  # the run's settings, resolved: what the PNG metadata records
    attention_maps: list[tuple[str, Tensor]] = field(default_factory=list)  # (token, (H, W) map in [0, 1])


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
    for name in given:
        value = getattr(config, name)
        if len(value) != 2 or min(value) < 0 or name.endswith("size") and min(value) < 1:
            raise GenerationError(f"{name}={value}: give (height, width), positive sizes or a crop of 0 or more")
    positive = {
        "original_size": tuple(config.original_size or (height, width)),
        "crop_top_left": tuple(config.crop_top_left or (0, 0)),
        "target_size": tuple(config.target_size or (height, width)),
    }
    if (config.negative_original_size is None) != (config.negative_target_size is None):
        raise GenerationError("negative_original_size and negative_target_size go together, as in diffusers")
    if config.negative_original_size is None:  # diffusers: then the negative ids are the positive ones
        return positive | {f"negative_{n}": positive[n] for n in names}
    negative_crop = tuple(config.negative_crop_top_left or (0, 0))
    return positive | {
        "negative_original_size": tuple(config.negative_original_size),
        "negative_crop_top_left": negative_crop,
        "negative_target_size": tuple(config.negative_target_size),
    }


def refiner_switch(config: GenerationConfig, refiner: bool, init_image: bool) -> float | None:
    """The refiner's switch, checked; None without a refiner."""
    switch = config.refiner_switch
    if not refiner:
        if switch is not None:
            raise GenerationError("refiner_switch: there is no refiner to switch to")
        return None
    if init_image or config.attention_maps:
        raise GenerationError("a refiner runs with text-to-image only: not with an init image or attention maps")
    switch = DEFAULT_SWITCH if switch is None else switch
    if not 0 < switch < 1:
        raise GenerationError(f"refiner_switch={switch}: the fraction of the noise schedule the base runs, in (0, 1)")
    return switch
