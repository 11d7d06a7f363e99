"""Prompt -> image: classifier-free guidance, the denoising loop, decoding. Image-to-image and
inpainting are the same loop started from a noised image instead of pure noise.

Reproducibility: image k of a run uses seed S+k, and its initial noise is drawn as diffusers
draws it (`torch.randn` of the latent shape from a CPU generator seeded with S+k, times the
scheduler's `init_noise_sigma`), so the same model, prompt, seed, scheduler and guidance give
the same picture here, in `diffusers.StableDiffusionPipeline` (`StableDiffusionXLPipeline` for
SDXL), and in any batch size.

SDXL's UNet also takes the pooled text and its size conditioning (pipelines/conditioning.py):
by default the output size, crop (0, 0) and the output size, as in diffusers. An SDXL refiner
(`load_refiner`) runs the last steps of each image (pipelines/refiner.py).
"""

import contextlib
import inspect
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import fields, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ldm.attention import capture_attention_probs
from ldm.autoencoder import downsampling_factor, images_to_latents, latents_to_images
from ldm.controlnet import ControlNet
from ldm.lora import merge_lora
from ldm.model import LatentDiffusion
from ldm.single_file import load_model
from pipelines.attend import AttendExcite, subjects
from pipelines.attention_maps import AttentionMapAccumulator
from pipelines.choices import SIZE_CONDITIONING
from pipelines.conditioning import Conditioning, encode_batch, time_ids, zero_negative
from pipelines.control import Control, ControlledUNet, control_pixels
from pipelines.devices import evaluating, memory_of, on_device, pick_device, pick_dtype
from pipelines.embeddings import EmbeddingFolder
from pipelines.hires import DEFAULT_DENOISE, hires_size, schedule_length, upscale_latents
from pipelines.pictures import image_to_tensor, mask_to_tensor, tensor_to_image
from pipelines.prompt_editing import prompt_schedule
from pipelines.prompts import encoder_widths, split_into_chunks
from pipelines.refiner import (
    AESTHETIC_SCORE,
    NEGATIVE_AESTHETIC_SCORE,
    refiner_timesteps,
    switch_timestep,
)
from pipelines.samplers import check_scheduler, make_scheduler, scheduler_name
from pipelines.settings import (
    MAX_SEED,
    Generated,
    GenerationConfig,
    GenerationError,
    refiner_switch,
    size_conditioning,
)
from pipelines.step_texts import StepTexts, Text, check_texts, edited

OnStep = Callable[[int, int, Tensor], None]  # (steps done, steps of the batch, latents for a preview)
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_STRENGTH = 30, 7.5, 0.8  # where neither the user nor the model says


class Images(NamedTuple):
    """The pictures a run starts from, as tensors at the output size."""

    init: Tensor | None  # (1, 3, H, W) in [-1, 1]
    mask: Tensor | None  # (1, 1, H, W), 1 where the image is repainted
    latents: Tensor | None = None  # instead of `init`, already encoded, one per image: a hires pass's start
    control: tuple[tuple[Control, Tensor], ...] = ()  # ControlNet units, each with its image (1, 3, H, W) in [0, 1]


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
        if model.is_refiner:
            raise GenerationError("an SDXL refiner finishes a base model's images: load it as the base's refiner")
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.model = on_device(model, self.device, self.dtype, copy=True)
        self.refiner: LatentDiffusion | None = None
        self.embeddings: EmbeddingFolder | None = None  # textual inversion: see load_embeddings
        self.unet = torch.compile(self.model.unet) if compile else self.model.unet
        self.vae_tiling = vae_tiling  # decode large images tile by tile, in bounded memory

    @classmethod
    def from_pretrained(cls, source: str | Path, **options) -> "TextToImagePipeline":
        """A diffusers-layout folder or hub id, or an original single-file .safetensors/.ckpt checkpoint."""
        device = pick_device(options.get("device", "auto"))
        dtype = pick_dtype(options.get("dtype", "auto"), device)
        model = load_model(source, dtype=dtype)  # read in the run's precision: no fp32 copy beside it
        return cls(on_device(model, device, dtype, copy=False), **options)  # ours: no copy needed

    def load_lora(self, path: str | Path, scale: float = 1.0) -> None:
        """Merge a LoRA file (diffusers/peft or kohya format) into the weights, `scale` times its strength."""
        merge_lora(self.model, path, scale)

    def load_controlnet(self, path: str | Path) -> ControlNet:
        """A ControlNet for this model, in its precision: a diffusers folder, or an original single
        file (which carries no config, so it is read as a ControlNet for this model's UNet)."""
        if Path(path).is_file():
            return ControlNet.load_single_file(path, self.model.unet.config, self.dtype)
        return ControlNet.load(path, self.dtype)

    def load_embeddings(self, folder: str | Path) -> None:
        """Textual-inversion embeddings: a prompt word that names a file in `folder` (its stem, as
        A1111 names them) is replaced by the file's vectors, in prompts and negative prompts."""
        self.embeddings = EmbeddingFolder(folder)

    def ti_hashes(self, prompt: str, config: GenerationConfig) -> str | None:
        """A1111's `TI hashes` infotext value: `name: short hash` for each embedding the prompt or
        the negative prompt uses (any text of their schedules), or None for none."""
        if self.embeddings is None:
            return None
        encoders = self.model.text_encoders()
        widths = encoder_widths(encoders)
        used: dict[str, str] = {}
        for text in (prompt, config.negative_prompt):
            for _, scheduled in prompt_schedule(text, config.steps):
                chunks = split_into_chunks(encoders[0][0], scheduled, config.emphasis, self.embeddings, widths)
                used |= {embedding.name: embedding.short_hash for _, _, embedding in chunks.fixes}
        # A1111 drops ":" and "," from the names (modules/sd_hijack_clip.py, 5ad03e65)
        return ", ".join(f"{re.sub('[:,]', '', name)}: {short}" for name, short in used.items()) or None

    def load_refiner(self, source: str | Path) -> None:
        """An SDXL refiner (a diffusers folder, hub id or single file; an SDXL base works too) that
        runs the last steps of every image, from GenerationConfig.refiner_switch on."""
        if not self.model.is_sdxl:
            raise GenerationError("a refiner finishes an SDXL model's images; this model is not SDXL")
        refiner = load_model(source, dtype=self.dtype)
        if not refiner.is_sdxl:
            raise GenerationError(f"{source}: not an SDXL model, so it cannot refine SDXL latents")
        self.refiner = on_device(refiner, self.device, self.dtype, copy=False)

    @property
    def models(self) -> list[LatentDiffusion]:
        """The model, and the refiner that finishes its images if one is loaded."""
        return [self.model] + ([self.refiner] if self.refiner else [])

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
        on_step: OnStep | None = None,
        control: list[Control] | None = None,
        **options,
    ) -> Iterator[Generated]:
        """`num_images` per prompt, `batch_size` at a time; image k of the run uses seed `seed + k`.
        `options` are GenerationConfig's fields. Every setting is checked before the first image;
        each batch's images come out as soon as they are done. `on_step(step, steps, latents)` is
        called after each denoising step (a server's progress and preview; raising in it stops the run).
        `control`: ControlNet units (pipelines/control.py), their residuals added at every step they act in."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        unknown = sorted(set(options) - {f.name for f in fields(GenerationConfig)})
        if unknown:
            raise GenerationError(f"unknown option(s) {unknown}: use {[f.name for f in fields(GenerationConfig)]}")
        config, images = self.resolve(GenerationConfig(**options), init_image, mask, control)
        for text in [*prompts, config.negative_prompt]:
            check_texts(text, config.steps, config.emphasis)
            for name, asked in (("attention maps", config.attention_maps), ("attend", config.attend)):
                if asked and edited(text, config.steps):
                    raise GenerationError(f"{name}: not with prompt editing ([a:b:5], [a|b]); its tokens change")
        if config.attend:  # each prompt's subject words found before the first image
            for text in prompts:
                subjects(config.attend, self._prompt_tokens(text, config.emphasis), text)
        refining = evaluating(self.refiner, False) if self.refiner else contextlib.nullcontext()
        with evaluating(self.model, self.vae_tiling), refining:
            yield from self._generate_all(prompts, config, images, on_step)

    def _generate_all(
        self, prompts: list[str], config: GenerationConfig, images: Images, on_step: OnStep | None
    ) -> Iterator[Generated]:
        jobs = [(p, config.seed + k) for k, p in enumerate(p for p in prompts for _ in range(config.num_images))]
        guided = config.guidance_scale > 1  # as diffusers: no unconditional pass at scale <= 1
        negatives = [{} if guided else None for _ in self.models]  # each model's, by text: encoded once per run
        for start in range(0, len(jobs), config.batch_size):
            batch = jobs[start : start + config.batch_size]
            prompts_seeds = [p for p, _ in batch], [s for _, s in batch]
            yield from self._generate_batch(*prompts_seeds, negatives, config, images, on_step)

    def resolve(
        self,
        config: GenerationConfig,
        init_image: Image.Image | None,
        mask: Image.Image | None,
        control: list[Control] | None = None,
    ) -> tuple[GenerationConfig, Images]:
        """Check the settings against this model and the pictures given (the config checked the rest
        when it was made); fill in every default (size, steps, guidance, scheduler, strength, seed)
        and make the pictures tensors at the output size."""
        height, width = self._size(config, init_image)
        sampling = self.model.sampling
        steps, guidance_scale, strength = config.steps, config.guidance_scale, config.strength
        steps = (sampling.steps if sampling else DEFAULT_STEPS) if steps is None else steps
        if guidance_scale is None:
            guidance_scale = sampling.guidance_scale if sampling else DEFAULT_GUIDANCE
        trained_steps = self.model.scheduler.config.num_train_timesteps
        if steps > trained_steps:
            raise GenerationError(f"steps={steps}: must be 1 to {trained_steps}, the model's training timesteps")
        if strength is not None and init_image is None:
            raise GenerationError("a strength needs an init image: it says how far to move from that picture")
        strength = DEFAULT_STRENGTH if init_image is not None and strength is None else strength
        if mask is not None and init_image is None:
            raise GenerationError("a mask needs an init image: the picture whose masked part is repainted")
        if self.model.unet.config.in_channels == 9 and mask is None:
            raise GenerationError("this is an inpainting model (9-channel UNet): give it an init image and a mask")
        scheduler = config.scheduler or self.default_scheduler
        check_scheduler(scheduler, self.model.scheduler)
        sizes = size_conditioning(config, self.model.is_sdxl, height, width)
        switch = refiner_switch(config, self.refiner is not None, init_image is not None)
        hires = self._check_hires(config, init_image is not None, height, width)
        if self.refiner:
            check_scheduler(scheduler, self.refiner.scheduler)
        resolved = replace(
            config,
            steps=steps,
            guidance_scale=guidance_scale,
            strength=strength,
            height=height,
            width=width,
            scheduler=scheduler,
            seed=random.randrange(MAX_SEED + 1 - config.num_images) if config.seed is None else config.seed,
            refiner_switch=switch,
            **sizes,
            **hires,
        )
        return resolved, Images(
            None if init_image is None else image_to_tensor(init_image.convert("RGB"), width, height),
            None if mask is None else mask_to_tensor(mask, width, height),
            control=self._control(control or [], resolved),
        )

    def _control(self, control: list[Control], config: GenerationConfig) -> tuple[tuple[Control, Tensor], ...]:
        """Each unit checked against this model and run, with its image at the output size."""
        if config.attend and (self.refiner is not None or config.hires_scale is not None):
            raise GenerationError("attend: not with a refiner or the hires fix yet")
        if control and (self.refiner is not None or config.hires_scale is not None):
            raise GenerationError("ControlNet: not with a refiner or the hires fix yet")
        factor = downsampling_factor(self.model.vae)
        for unit in control:
            unit.controlnet.fits(self.model.unet)
            if unit.controlnet.downsampling != factor:
                raise GenerationError(
                    f"ControlNet: it reads control images {unit.controlnet.downsampling}x the latents' size; this "
                    f"model's VAE downsamples {factor}x (a ControlNet made for another model?)"
                )
            unit.controlnet.to(self.device, self.dtype)
        return tuple((unit, control_pixels(unit.image, config.width, config.height)) for unit in control)

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
        self._check_memory(height, width)
        return height, width

    def _check_hires(self, config: GenerationConfig, init_image: bool, height: int, width: int) -> dict:
        """The hires fix's settings, resolved; {} without one."""
        if config.hires_scale is None:
            given = [n for n in ("hires_upscaler", "hires_steps", "hires_denoise") if getattr(config, n) is not None]
            if given:
                raise GenerationError(f"{', '.join(given)}: set with hires_scale, the hires fix's upscale factor")
            return {}
        if init_image or config.attention_maps or self.refiner:
            raise GenerationError("hires fix: text-to-image only, not with an init image, attention maps or a refiner")
        multiple = max(8, downsampling_factor(self.model.vae))
        larger = hires_size(height, width, config.hires_scale, multiple)
        self._check_memory(*larger)
        upscaler = config.hires_upscaler or "latent"
        denoise = DEFAULT_DENOISE if config.hires_denoise is None else config.hires_denoise
        return {"hires_upscaler": upscaler, "hires_denoise": denoise}

    def _check_memory(self, height: int, width: int) -> None:
        """Refuse a size that cannot fit, by two lower bounds on what one image needs: the UNet's first
        level holds guided pairs of latent-resolution activations of its first width of channels; the
        VAE decoder's last block (unless tiled) two full-resolution ones of its first width."""
        factor, itemsize = downsampling_factor(self.model.vae), self.model.unet.conv_in.weight.dtype.itemsize
        unet = 2 * 2 * (height // factor) * (width // factor) * self.model.unet.config.block_out_channels[0] * itemsize
        decoder = 0 if self.vae_tiling else 2 * height * width * self.model.vae.config.block_out_channels[0] * itemsize
        need, have = max(unet, decoder), memory_of(self.device)
        if need > have:
            raise GenerationError(
                f"{height}x{width}: needs at least {need / 2**30:,.0f} GiB and the {self.device.type} has "
                f"{have / 2**30:,.0f} GiB; choose a smaller size" + ("" if self.vae_tiling else " or tile the VAE")
            )

    def _generate_batch(
        self,
        prompts: list[str],
        seeds: list[int],
        negatives: list[dict[str, Conditioning] | None],
        config: GenerationConfig,
        images: Images,
        on_step: OnStep | None,
    ) -> list[Generated]:
        """`negatives`: the negative prompts' conditioning encoded so far in the run, by text, for the
        model (and the refiner); None without guidance."""
        texts = [self._texts(m, prompts, config, negative) for m, negative in zip(self.models, negatives, strict=True)]
        factor = downsampling_factor(self.model.vae)
        latent_size = (config.height // factor, config.width // factor)
        maps = AttentionMapAccumulator(len(prompts), latent_size) if config.attention_maps else None
        attend = None
        if config.attend:
            found = [subjects(config.attend, self._prompt_tokens(p, config.emphasis), p) for p in prompts]
            attend = AttendExcite(self.model.unet, found, latent_size) if any(found) else None
        if maps is None:
            latents = self._denoise(texts, seeds, config, images, latent_size, maps, on_step, attend)
        else:
            with capture_attention_probs(self.model.unet, maps):
                latents = self._denoise(texts, seeds, config, images, latent_size, maps, on_step, attend)
        if config.hires_scale is not None:
            latents = self._hires_pass(latents, prompts, seeds, negatives[0] is not None, config, on_step)
        if not torch.isfinite(latents).all():  # else a black picture, as if nothing were wrong
            raise GenerationError(
                "the denoised latents are not finite (NaN or infinity): the model's weights hold NaN or infinity, "
                f"or {self.dtype} overflowed (try fp32)"
            )
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

    def _hires_pass(
        self, latents: Tensor, prompts: list[str], seeds: list[int], guided: bool, config: GenerationConfig,
        on_step: OnStep | None,
    ) -> Tensor:  # fmt: skip
        """The hires fix's second pass (pipelines/hires.py): upscale, then image-to-image at the larger size."""
        factor = downsampling_factor(self.model.vae)
        height, width = hires_size(config.height, config.width, config.hires_scale, max(8, factor))
        if config.hires_upscaler == "latent":
            start = upscale_latents(latents, height, width, factor)
        else:
            pictures = [tensor_to_image(picture) for picture in self._decode(latents).float()]
            start = torch.cat([self._encode_image(image_to_tensor(p, width, height)) for p in pictures])
        if config.hires_denoise == 0:  # nothing to redraw: the upscaled picture itself
            return start
        steps = config.hires_steps or config.steps
        larger = {
            name: (height, width)
            for name in SIZE_CONDITIONING
            if getattr(config, name) == (config.height, config.width)
        }
        second = replace(config, height=height, width=width, steps=schedule_length(steps, config.hires_denoise),
                         strength=config.hires_denoise, hires_scale=None, hires_upscaler=None, hires_steps=None,
                         hires_denoise=None, **larger)  # fmt: skip
        # A1111 schedules edited prompts over the steps the pass runs; a fresh cache: SDXL's size ids changed
        texts = [self._texts(self.model, prompts, replace(second, steps=steps), {} if guided else None)]
        latent_size = (height // factor, width // factor)
        return self._denoise(texts, seeds, second, Images(None, None, start), latent_size, None, on_step)

    def _texts(
        self,
        model: LatentDiffusion,
        prompts: list[str],
        config: GenerationConfig,
        negatives: dict[str, Conditioning] | None,
    ) -> StepTexts:
        """The batch's conditioning for `model` (the base or the refiner) at each step. The refiner's
        one encoder reads the prompt, not prompt_2, as in diffusers' refiner pipeline."""
        prompt_2 = config.prompt_2 if model is self.model else None
        ids = self._time_ids(model, config, "")

        def encode(texts: list[str]) -> Conditioning:
            return encode_batch(model, texts, config.emphasis, config.truncate, ids, prompt_2, self.embeddings)

        def negative(text: str) -> Conditioning:
            if text not in negatives:
                negatives[text] = self._negative(model, config, text)
            return negatives[text]

        guided = negatives is not None
        return StepTexts(prompts, config.negative_prompt if guided else None, config.steps, encode, negative)

    def _negative(self, model: LatentDiffusion, config: GenerationConfig, text: str) -> Conditioning:
        """A negative text's conditioning; zeros where no negative prompt is given and the model asks
        for that."""
        ids = self._time_ids(model, config, "negative_")
        empty = not config.negative_prompt and not config.negative_prompt_2
        if model.is_sdxl and model.force_zeros_for_empty_prompt and empty:
            return zero_negative(model, ids)
        prompt_2 = config.negative_prompt_2 if model is self.model else None
        return encode_batch(model, [text], config.emphasis, config.truncate, ids, prompt_2, self.embeddings)

    def _time_ids(self, model: LatentDiffusion, config: GenerationConfig, prefix: str) -> Tensor | None:
        if not model.is_sdxl:
            return None
        sizes = {name: getattr(config, name) for name in SIZE_CONDITIONING}
        score = (NEGATIVE_AESTHETIC_SCORE if prefix else AESTHETIC_SCORE) if model.is_refiner else None
        return time_ids(sizes, prefix, self.device, self.dtype, score)

    def _decode(self, latents: Tensor) -> Tensor:
        """Latents -> pixels, in the VAE's own precision (fp32 for SDXL's when the run is fp16)."""
        vae = self.model.vae
        return latents_to_images(vae, latents.to(vae.dtype)).to(latents.dtype)

    def _encode_image(self, image: Tensor) -> Tensor:
        vae = self.model.vae
        return images_to_latents(vae, image.to(self.device, vae.dtype), mean=True).to(self.dtype)

    def _predict(
        self, unet, x: Tensor, t: Tensor, text: Text, guidance_scale: float, maps: AttentionMapAccumulator | None
    ) -> Tensor:
        """The UNet's prediction, guided: uncond + scale * (cond - uncond). The two share one batch when
        their texts have the same length; a negative prompt of another length runs at its own, as in A1111."""
        if text.unconditional is None:
            return unet(x, t, *text.conditional)
        if text.unconditional.text.shape[1] == text.conditional.text.shape[1]:
            both = unet(torch.cat([x, x]), t, *Conditioning.cat(text.unconditional, text.conditional))
            unconditional, conditional = both.chunk(2)
        else:
            with maps.paused() if maps is not None else contextlib.nullcontext():
                unconditional = unet(x, t, *text.unconditional)
            conditional = unet(x, t, *text.conditional)
        return unconditional + guidance_scale * (conditional - unconditional)

    def _denoise(
        self,
        texts: list[StepTexts],
        seeds: list[int],
        config: GenerationConfig,
        images: Images,
        latent_size: tuple[int, int],
        maps: AttentionMapAccumulator | None,
        on_step: OnStep | None,
        attend: AttendExcite | None = None,
    ) -> Tensor:
        """The sampling loop: start latents, then one guided UNet prediction and scheduler step per
        timestep; with a refiner, the base's steps down to the switch, then the refiner's (`texts`:
        the conditioning of each). `attend` moves the latents before each of the first steps."""
        scheduler = make_scheduler(config.scheduler, self.model.scheduler)
        scheduler.set_timesteps(config.steps, device=self.device)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        shape = (1, self.model.vae.config.latent_channels, *latent_size)
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)
        latents, timesteps, original = self._prepare_latents(scheduler, config, images, noise)
        latent_mask, inpaint_input = self._prepare_inpainting(images, latent_size, len(seeds))
        if self.refiner:
            cutoff = switch_timestep(scheduler, config.refiner_switch)
            timesteps = timesteps[timesteps >= cutoff]

        step_options = _step_options(scheduler, generators)
        for i, t in enumerate(tqdm(timesteps, disable=not config.progress, desc="denoising", leave=False)):
            if attend is not None:  # the conditional pass alone, as Attend-and-Excite reads it
                conditional = texts[0].at(i).conditional
                predict = partial(self._conditional, scheduler, t, inpaint_input, conditional)
                latents = attend(predict, latents, i, len(timesteps))
            x = _model_input(scheduler, latents, t, inpaint_input)
            unet = ControlledUNet(self.unet, images.control, i, len(timesteps)) if images.control else self.unet
            prediction = self._predict(unet, x, t, texts[0].at(i), config.guidance_scale, maps)
            stepped = scheduler.step(prediction, t, latents, **step_options)
            latents = stepped.prev_sample
            if latent_mask is not None and inpaint_input is None:  # outside the mask: the re-noised original
                later = timesteps[i + 1 : i + 2]
                outside = scheduler.add_noise(original, noise, later) if len(later) else original
                latents = latent_mask * latents + (1 - latent_mask) * outside
            if on_step is not None:
                on_step(i + 1, len(timesteps), _preview(stepped))
        if not self.refiner:
            return latents
        return self._refine(latents, texts[1], len(timesteps), cutoff, config, generators, on_step)

    def _conditional(self, scheduler, t: Tensor, inpaint_input: Tensor | None, text: Conditioning, latents: Tensor):
        """The UNet's prediction for the prompt alone (no guidance)."""
        return self.unet(_model_input(scheduler, latents, t, inpaint_input), t, *text)

    def _refine(
        self,
        latents: Tensor,
        texts: StepTexts,
        first_step: int,
        cutoff: int,
        config: GenerationConfig,
        generators: list[torch.Generator],
        on_step: OnStep | None,
    ) -> Tensor:
        """The refiner's steps, below the cutoff, with its own scheduler of the same kind."""
        scheduler = make_scheduler(config.scheduler, self.refiner.scheduler)
        scheduler.set_timesteps(config.steps, device=self.device)
        step_options = _step_options(scheduler, generators)
        timesteps = refiner_timesteps(scheduler, cutoff)
        for i, t in enumerate(tqdm(timesteps, disable=not config.progress, desc="refining", leave=False)):
            x = scheduler.scale_model_input(latents, t)
            prediction = self._predict(self.refiner.unet, x, t, texts.at(first_step + i), config.guidance_scale, None)
            stepped = scheduler.step(prediction, t, latents, **step_options)
            latents = stepped.prev_sample
            if on_step is not None:
                on_step(i + 1, len(timesteps), _preview(stepped))
        return latents

    def _prepare_latents(
        self, scheduler, config: GenerationConfig, images: Images, noise: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(start latents, the timesteps to run, the init image's latents or None). From pure noise;
        or, with an init image, from that image noised to the level of the first step run."""
        timesteps = scheduler.timesteps
        if images.init is None and images.latents is None:
            return noise * scheduler.init_noise_sigma, timesteps, None
        if images.latents is not None:
            original = images.latents
        else:
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
        chunks = self._chunks(prompt, emphasis)
        pairs = zip(chunks.tokens, chunks.positions, strict=True)
        return [(token, maps[p].cpu()) for token, p in pairs if p < len(maps)]

    def _chunks(self, prompt: str, emphasis: str):
        widths = encoder_widths(self.model.text_encoders())
        return split_into_chunks(self.model.tokenizer, prompt, emphasis, self.embeddings, widths)

    def _prompt_tokens(self, prompt: str, emphasis: str) -> list[str]:
        """The texts of the prompt's tokens at positions 1, 2, ... of its conditioning."""
        chunks = self._chunks(prompt, emphasis)
        by_position = dict(zip(chunks.positions, chunks.tokens, strict=True))
        return [by_position.get(p, "") for p in range(1, max(by_position, default=0) + 1)]


def _model_input(scheduler, latents: Tensor, t: Tensor, inpaint_input: Tensor | None) -> Tensor:
    """What the UNet reads at step t: the latents scaled as the sampler asks (and, for an inpainting
    UNet, the mask and masked image's latents beside them)."""
    x = scheduler.scale_model_input(latents, t)
    return x if inpaint_input is None else torch.cat([x, inpaint_input], dim=1)


def _preview(stepped) -> Tensor:
    """A step's estimate of the clean latents where the sampler gives one, else its next latents."""
    estimate = getattr(stepped, "pred_original_sample", None)
    return stepped.prev_sample if estimate is None else estimate


def _step_options(scheduler, generators: list[torch.Generator]) -> dict:
    """Ancestral and SDE samplers draw fresh noise each step: one generator per image keeps
    image k the same in any batch. DDIM takes eta=0 (deterministic), as in diffusers."""
    accepted = inspect.signature(scheduler.step).parameters
    options = {"generator": generators} if "generator" in accepted else {}
    return options | ({"eta": 0.0} if "eta" in accepted else {})
