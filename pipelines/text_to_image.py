"""Prompt -> image: classifier-free guidance, the denoising loop, decoding. Image-to-image and
inpainting are the same loop started from a noised image instead of pure noise.

Reproducibility: image k of a run uses seed S+k, and its initial noise is drawn as diffusers
draws it (`torch.randn` of the latent shape from a CPU generator seeded with S+k, times the
scheduler's `init_noise_sigma`), so the same model, prompt, seed, scheduler and guidance give
the same picture here, in `diffusers.StableDiffusionPipeline` (`StableDiffusionXLPipeline` for
SDXL), and in any batch size.

SDXL's UNet also takes the pooled text and its size conditioning (pipelines/conditioning.py):
by default the output size, crop (0, 0) and the output size, as in diffusers.
"""

import contextlib
import inspect
import random
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ldm.attention import capture_attention_probs
from ldm.autoencoder import downsampling_factor, images_to_latents, latents_to_images
from ldm.errors import UserError
from ldm.lora import merge_lora
from ldm.model import LatentDiffusion
from ldm.single_file import load_single_file
from pipelines.attention_maps import AttentionMapAccumulator
from pipelines.conditioning import SIZE_CONDITIONING, Conditioning, encode_batch, time_ids, zero_negative
from pipelines.devices import pick_device, pick_dtype
from pipelines.pictures import image_to_tensor, mask_to_tensor, tensor_to_image
from pipelines.prompts import EMPHASIS_MODES, split_into_chunks
from pipelines.samplers import check_scheduler, make_scheduler, scheduler_name

DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_STRENGTH = 30, 7.5, 0.8  # where neither the user nor the model says


class GenerationError(UserError):
    """A request the pipeline cannot carry out (bad size, strength, missing image); one line."""


class Text(NamedTuple):
    """A batch's conditioning: the prompts', and the negative prompt's (None without guidance)."""

    conditional: Conditioning
    unconditional: Conditioning | None  # its text may have another number of tokens


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
    progress: bool = True


class Images(NamedTuple):
    """The pictures a run starts from, as tensors at the output size."""

    init: Tensor | None  # (1, 3, H, W) in [-1, 1]
    mask: Tensor | None  # (1, 1, H, W), 1 where the image is repainted


@dataclass
class Generated:
    image: Image.Image
    prompt: str
    seed: int
    config: GenerationConfig  # the run's settings, resolved: what the PNG metadata records
    attention_maps: list[tuple[str, Tensor]] = field(default_factory=list)  # (token, (H, W) map in [0, 1])


class TextToImagePipeline:
    """Generate images with a LatentDiffusion model.

    >>> pipe = TextToImagePipeline.from_pretrained("path/or/hub-id")
    >>> images = pipe("a red circle", seed=0)
    """

    def __init__(
        self,
        model: LatentDiffusion,
        device: str = "auto",
        dtype: str = "auto",
        compile: bool = False,
        vae_tiling: bool = False,
    ):
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.model = _on(model, self.device, self.dtype, copy=True)
        self.unet = torch.compile(self.model.unet) if compile else self.model.unet
        self.vae_tiling = vae_tiling  # decode large images tile by tile, in bounded memory

    @classmethod
    def from_pretrained(cls, source: str | Path, **options) -> "TextToImagePipeline":
        """A diffusers-layout folder or hub id, or an original single-file .safetensors/.ckpt checkpoint."""
        model = (
            load_single_file(source)
            if str(source).endswith((".safetensors", ".ckpt"))
            else LatentDiffusion.load(source)
        )
        device, dtype = pick_device(options.get("device", "auto")), options.get("dtype", "auto")
        return cls(_on(model, device, pick_dtype(dtype, device), copy=False), **options)  # ours: no copy needed

    def load_lora(self, path: str | Path, scale: float = 1.0) -> None:
        """Merge a LoRA file (diffusers/peft or kohya format) into the weights, `scale` times its strength."""
        merge_lora(self.model, path, scale)

    @property
    def default_scheduler(self) -> str:
        return scheduler_name(self.model.scheduler)

    def __call__(self, prompt: str | list[str], **options) -> list[Image.Image]:
        return [generated.image for generated in self.generate(prompt, **options)]

    def generate(self, prompt: str | list[str], **options) -> list[Generated]:
        """Every image of `generate_each`, in a list."""
        return list(self.generate_each(prompt, **options))

    @torch.no_grad()
    def generate_each(
        self,
        prompt: str | list[str],
        init_image: Image.Image | None = None,
        mask: Image.Image | None = None,
        **options,
    ) -> Iterator[Generated]:
        """`num_images` per prompt, `batch_size` at a time; image k of the run uses seed `seed + k`.
        `options` are GenerationConfig's fields. Every setting is checked before the first image;
        each batch's images come out as soon as they are done."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        unknown = sorted(set(options) - {f.name for f in fields(GenerationConfig)})
        if unknown:
            raise GenerationError(f"unknown option(s) {unknown}: use {[f.name for f in fields(GenerationConfig)]}")
        config, images = self._resolve(GenerationConfig(**options), init_image, mask)
        with _inference(self.model, self.vae_tiling):
            yield from self._generate_all(prompts, config, images)

    def _generate_all(self, prompts: list[str], config: GenerationConfig, images: Images) -> Iterator[Generated]:
        jobs = [(p, config.seed + k) for k, p in enumerate(p for p in prompts for _ in range(config.num_images))]
        guided = config.guidance_scale > 1  # as diffusers: no unconditional pass at scale <= 1
        negative = self._negative(config) if guided else None  # once for the run
        for start in range(0, len(jobs), config.batch_size):
            batch = jobs[start : start + config.batch_size]
            yield from self._generate_batch([p for p, _ in batch], [s for _, s in batch], negative, config, images)

    def _resolve(
        self, config: GenerationConfig, init_image: Image.Image | None, mask: Image.Image | None
    ) -> tuple[GenerationConfig, Images]:
        """Check the settings a person gave; fill in every default (size, steps, guidance, scheduler,
        strength, seed) and make the pictures tensors at the output size."""
        if config.num_images < 1 or config.batch_size < 1:
            raise GenerationError(
                f"num_images={config.num_images}, batch_size={config.batch_size}: both must be at least 1"
            )
        height, width = self._size(config, init_image)
        sampling = self.model.sampling
        steps, guidance_scale, strength = config.steps, config.guidance_scale, config.strength
        steps = (sampling.steps if sampling else DEFAULT_STEPS) if steps is None else steps
        if guidance_scale is None:
            guidance_scale = sampling.guidance_scale if sampling else DEFAULT_GUIDANCE
        if steps < 1:
            raise GenerationError(f"steps={steps}: must be at least 1")
        if config.emphasis not in EMPHASIS_MODES:
            raise GenerationError(f"emphasis={config.emphasis!r}: use one of {', '.join(EMPHASIS_MODES)}")
        if strength is not None and init_image is None:
            raise GenerationError("a strength needs an init image: it says how far to move from that picture")
        strength = DEFAULT_STRENGTH if init_image is not None and strength is None else strength
        if strength is not None and not 0 <= strength <= 1:
            raise GenerationError(f"strength={strength}: must be between 0 and 1")
        if mask is not None and init_image is None:
            raise GenerationError("a mask needs an init image: the picture whose masked part is repainted")
        if self.model.unet.config.in_channels == 9 and mask is None:
            raise GenerationError("this is an inpainting model (9-channel UNet): give it an init image and a mask")
        scheduler = config.scheduler or self.default_scheduler
        check_scheduler(scheduler, self.model.scheduler)
        sizes = self._sdxl_settings(config, height, width)
        resolved = replace(
            config,
            steps=steps,
            guidance_scale=guidance_scale,
            strength=strength,
            height=height,
            width=width,
            scheduler=scheduler,
            seed=random.randrange(2**32) if config.seed is None else config.seed,
            **sizes,
        )
        return resolved, Images(
            None if init_image is None else image_to_tensor(init_image.convert("RGB"), width, height),
            None if mask is None else mask_to_tensor(mask, width, height),
        )

    def _sdxl_settings(self, config: GenerationConfig, height: int, width: int) -> dict:
        """SDXL's six sizes, resolved (diffusers' defaults); other models refuse them and a second prompt."""
        names = SIZE_CONDITIONING[:3]
        given = [name for name in SIZE_CONDITIONING if getattr(config, name) is not None]
        if not self.model.is_sdxl:
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

    def _size(self, config: GenerationConfig, init_image: Image.Image | None) -> tuple[int, int]:
        """(height, width): as asked, else the init image's, else the model's own."""
        factor = downsampling_factor(self.model.vae)
        height, width = config.height, config.width
        if init_image is not None and height is None and width is None:
            width, height = (side // factor * factor for side in init_image.size)
        default = (self.model.unet.config.sample_size or 64) * factor
        height, width = (default if side is None else side for side in (height, width))
        multiple = max(8, factor)  # 8 as every SD tool asks; more if the VAE downsamples more
        for name, value in (("height", height), ("width", width)):
            if value < multiple or value % multiple:
                raise GenerationError(f"{name}={value}: must be a positive multiple of {multiple}")
        return height, width

    def _generate_batch(
        self,
        prompts: list[str],
        seeds: list[int],
        negative: Tensor | None,
        config: GenerationConfig,
        images: Images,
    ) -> list[Generated]:
        """`negative`: the negative prompt's conditioning for one image, None without guidance."""
        text = Text(self._encode(prompts, config), None if negative is None else negative.repeat(len(prompts)))
        factor = downsampling_factor(self.model.vae)
        latent_size = (config.height // factor, config.width // factor)
        maps = AttentionMapAccumulator(len(prompts), latent_size) if config.attention_maps else None
        if maps is None:
            latents = self._denoise(text, seeds, config, images, latent_size, maps)
        else:
            with capture_attention_probs(self.model.unet, maps):
                latents = self._denoise(text, seeds, config, images, latent_size, maps)
        pixels = self._decode(latents).float()
        if images.mask is not None:  # outside the mask, the original pixels exactly
            mask, original = images.mask.to(pixels.device), images.init.to(pixels.device)
            pixels = mask * pixels + (1 - mask) * original
        heatmaps = None if maps is None else maps.maps((config.height, config.width))
        results = []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
            results.append(Generated(tensor_to_image(pixels[i]), prompt, seed, config))
            if heatmaps is not None:
                results[-1].attention_maps = self._token_maps(prompt, config.emphasis, heatmaps[i])
        return results

    def _encode(self, prompts: list[str], config: GenerationConfig) -> Conditioning:
        ids = self._time_ids(config, "")
        return encode_batch(self.model, prompts, config.emphasis, config.truncate, ids, config.prompt_2)

    def _negative(self, config: GenerationConfig) -> Conditioning:
        """The negative prompt's conditioning; zeros for an empty one (both prompts empty) where the
        model asks for that."""
        ids = self._time_ids(config, "negative_")
        empty = not config.negative_prompt and not config.negative_prompt_2
        if self.model.is_sdxl and self.model.force_zeros_for_empty_prompt and empty:
            return zero_negative(self.model, ids)
        texts = [config.negative_prompt]
        return encode_batch(self.model, texts, config.emphasis, config.truncate, ids, config.negative_prompt_2)

    def _time_ids(self, config: GenerationConfig, prefix: str) -> Tensor | None:
        sizes = {name: getattr(config, name) for name in SIZE_CONDITIONING}
        return time_ids(sizes, prefix, self.device, self.dtype) if self.model.is_sdxl else None

    def _decode(self, latents: Tensor) -> Tensor:
        """Latents -> pixels, in the VAE's own precision (fp32 for SDXL's when the run is fp16)."""
        vae = self.model.vae
        return latents_to_images(vae, latents.to(vae.dtype)).to(latents.dtype)

    def _encode_image(self, image: Tensor) -> Tensor:
        vae = self.model.vae
        return images_to_latents(vae, image.to(self.device, vae.dtype), mean=True).to(self.dtype)

    def _predict(
        self, x: Tensor, t: Tensor, text: Text, guidance_scale: float, maps: AttentionMapAccumulator | None
    ) -> Tensor:
        """The UNet's prediction, guided: uncond + scale * (cond - uncond). The two share one batch when
        their texts have the same length; a negative prompt of another length runs at its own, as in A1111."""
        if text.unconditional is None:
            return self.unet(x, t, *text.conditional)
        if text.unconditional.text.shape[1] == text.conditional.text.shape[1]:
            both = self.unet(torch.cat([x, x]), t, *Conditioning.cat(text.unconditional, text.conditional))
            unconditional, conditional = both.chunk(2)
        else:
            with maps.paused() if maps is not None else contextlib.nullcontext():
                unconditional = self.unet(x, t, *text.unconditional)
            conditional = self.unet(x, t, *text.conditional)
        return unconditional + guidance_scale * (conditional - unconditional)

    def _denoise(
        self,
        text: Text,
        seeds: list[int],
        config: GenerationConfig,
        images: Images,
        latent_size: tuple[int, int],
        maps: AttentionMapAccumulator | None,
    ) -> Tensor:
        """The sampling loop: start latents, then one guided UNet prediction and scheduler step per timestep."""
        scheduler = make_scheduler(config.scheduler, self.model.scheduler)
        scheduler.set_timesteps(config.steps, device=self.device)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        shape = (1, self.model.vae.config.latent_channels, *latent_size)
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)
        latents, timesteps, original = self._prepare_latents(scheduler, config, images, noise)
        latent_mask, inpaint_input = self._prepare_inpainting(images, latent_size, len(seeds))

        step_options = _step_options(scheduler, generators)
        for i, t in enumerate(tqdm(timesteps, disable=not config.progress, desc="denoising", leave=False)):
            x = scheduler.scale_model_input(latents, t)
            if inpaint_input is not None:
                x = torch.cat([x, inpaint_input], dim=1)
            prediction = self._predict(x, t, text, config.guidance_scale, maps)
            latents = scheduler.step(prediction, t, latents, **step_options).prev_sample
            if latent_mask is not None and inpaint_input is None:  # outside the mask: the re-noised original
                later = timesteps[i + 1 : i + 2]
                outside = scheduler.add_noise(original, noise, later) if len(later) else original
                latents = latent_mask * latents + (1 - latent_mask) * outside
        return latents

    def _prepare_latents(
        self, scheduler, config: GenerationConfig, images: Images, noise: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(start latents, the timesteps to run, the init image's latents or None). From pure noise;
        or, with an init image, from that image noised to the level of the first step run."""
        timesteps = scheduler.timesteps
        if images.init is None:
            return noise * scheduler.init_noise_sigma, timesteps, None
        original = self._encode_image(images.init).expand(len(noise), -1, -1, -1)
        skip = config.steps - min(int(config.steps * config.strength), config.steps)
        timesteps = timesteps[skip * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(skip * scheduler.order)
        if config.strength == 1:
            return noise * scheduler.init_noise_sigma, timesteps, original
        latents = scheduler.add_noise(original, noise, timesteps[:1]) if len(timesteps) else original
        return latents, timesteps, original

    def _prepare_inpainting(
        self, images: Images, latent_size: tuple[int, int], batch: int
    ) -> tuple[Tensor | None, Tensor | None]:
        """(the mask at latent size, the extra UNet input of a 9-channel inpainting UNet: mask and
        unmasked image's latents); Nones without a mask."""
        if images.mask is None:
            return None, None
        pixel_mask = images.mask.to(self.device, self.dtype)
        latent_mask = F.interpolate(pixel_mask, size=latent_size).expand(batch, -1, -1, -1)
        if self.model.unet.config.in_channels != 9:
            return latent_mask, None
        kept = self._encode_image(images.init.to(self.device, self.dtype) * (pixel_mask < 0.5))
        return latent_mask, torch.cat([latent_mask, kept.expand(batch, -1, -1, -1)], dim=1)

    def _token_maps(self, prompt: str, emphasis: str, maps: Tensor) -> list[tuple[str, Tensor]]:
        """One (token text, map) per prompt token, skipping the start, end and padding tokens."""
        chunks = split_into_chunks(self.model.tokenizer, prompt, emphasis)
        pairs = zip(chunks.tokens, chunks.positions, strict=True)
        return [(token, maps[p].cpu()) for token, p in pairs if p < len(maps)]


def _on(model: LatentDiffusion, device: torch.device, dtype: torch.dtype, copy: bool) -> LatentDiffusion:
    """The model with every part on `device` in `dtype` (channels-last UNet on CUDA). Parts already
    so are shared; others are copied first when `copy` (a model we were handed stays as it was)."""
    parts = {}
    for name, part in model.parts().items():
        weight = next(part.parameters())
        # SDXL's VAE overflows in fp16: it decodes in fp32 unless its config says it need not (an fp16-fixed VAE)
        upcast = name == "vae" and model.is_sdxl and dtype == torch.float16 and part.config.force_upcast
        part_dtype = torch.float32 if upcast else dtype
        channels_last = (  # faster convolutions on tensor cores; a UNet already so needs no copy
            name == "unet"
            and device.type == "cuda"
            and not part.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        )
        if weight.dtype == part_dtype and weight.device == device and not channels_last:
            continue
        part = deepcopy(part) if copy else part
        if weight.dtype != part_dtype:  # diffusers warns on any dtype cast, even a no-op
            part.to(dtype=part_dtype)
        part.to(device)
        parts[name] = part.to(memory_format=torch.channels_last) if channels_last else part
    return replace(model, **parts)


@contextlib.contextmanager
def _inference(model: LatentDiffusion, vae_tiling: bool) -> Iterator[None]:
    """Every part in eval mode (and the VAE tiled, if asked) while generating; as they were after."""
    modes = {name: part.training for name, part in model.parts().items()}
    tiling = model.vae.use_tiling
    for part in model.parts().values():
        part.eval()
    if vae_tiling:
        model.vae.enable_tiling()
    try:
        yield
    finally:
        for name, part in model.parts().items():
            part.train(modes[name])
        model.vae.use_tiling = tiling


def _step_options(scheduler, generators: list[torch.Generator]) -> dict:
    """Ancestral and SDE samplers draw fresh noise each step: one generator per image keeps
    image k the same in any batch. DDIM takes eta=0 (deterministic), as in diffusers."""
    accepted = inspect.signature(scheduler.step).parameters
    options = {"generator": generators} if "generator" in accepted else {}
    return options | ({"eta": 0.0} if "eta" in accepted else {})
