"""Training stages: what one kind of training trains, its loss on a batch, and what it leaves in the
model when it ends. The loop (loop.py) is the same for every stage: data order, accumulation, EMA,
checkpoints, validation. A new way to train (LoRA, DreamBooth) is a new stage here.

    Stage            trains                               loss
    AutoencoderStage the VAE                              reconstruction + KL (objectives.py)
    DiffusionStage   the UNet (and maybe the text encoder) ε or v regression (+ grounding)
"""

import math
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from torch import Tensor, nn
from torch.utils.data import Dataset

from ldm.attention import capture_attention_probs
from ldm.autoencoder import images_to_latents
from ldm.data.datasets import CaptionedImages, boxes_file
from ldm.errors import ConfigError
from ldm.model import DTYPES, LatentDiffusion, SamplingDefaults
from ldm.text import encode_prompts
from ldm.train.cache import CachedExamples, build_cache, load_cache
from ldm.train.config import TrainConfig
from ldm.train.grounding import grounding_loss, grounding_targets
from ldm.train.objectives import ReconstructionObjective, diffusion_loss, psnr


class Stage:
    """One kind of training of `model`. The loop calls, in order: `check` before the model is built,
    `data` and `trained` once, `loss` every batch (with the trained modules as Accelerate wrapped
    them), `finish` and `save`."""

    @classmethod
    def check(cls, config: TrainConfig, dataset: Dataset) -> None:
        """What this stage needs of the data; ConfigError if it is not there."""

    def __init__(self, config: TrainConfig, model: LatentDiffusion, accelerator: Accelerator):
        self.config, self.model, self.accelerator = config, model, accelerator
        for part in model.parts().values():
            part.requires_grad_(False).eval()

    def data(self, dataset: Dataset) -> Dataset:
        """The dataset to train on, once checked against what this stage needs."""
        return dataset

    def trained(self) -> list[nn.Module]:
        """The modules this stage trains, put in training mode; the first is the one the EMA starts with."""
        raise NotImplementedError

    def loss(self, batch: dict, modules: list[nn.Module]) -> Tensor:
        raise NotImplementedError

    def finish(self) -> None:
        """On every process, after the last step, with the EMA weights in place."""

    def save(self, output: Path) -> None:
        """On the main process: the trained model, in the recipe's precision."""
        for part in self.model.parts().values():
            part.to(DTYPES[self.config.save_precision])
        self.model.save(output / "model")


class AutoencoderStage(Stage):
    """Trains the VAE on pixels; at the end, measures it on held-out images and sets its latent scale."""

    def data(self, dataset: Dataset) -> Dataset:
        self.holdout = None
        if not isinstance(dataset, CaptionedImages):
            return dataset
        count = min(self.config.autoencoder.holdout, len(dataset) - 1)
        self.holdout = CaptionedImages(dataset.entries[:count], dataset.options)
        return CaptionedImages(dataset.entries[count:], dataset.options)

    def trained(self) -> list[nn.Module]:
        autoencoder = self.config.autoencoder
        if self.config.steps.gradient_checkpointing:
            self.model.vae.enable_gradient_checkpointing()
        objective = ReconstructionObjective(self.model.vae, autoencoder.loss, autoencoder.kl_weight)
        return [objective.requires_grad_(True).train()]

    def loss(self, batch: dict, modules: list[nn.Module]) -> Tensor:
        return modules[0](batch["pixels"].to(self.accelerator.device))

    def finish(self) -> None:
        if self.holdout is not None:
            self._calibrate(self.holdout)

    @torch.no_grad()
    def _calibrate(self, holdout: CaptionedImages) -> None:
        """Report held-out PSNR, and set scaling_factor = 1/std of the latents, as SD did for its VAE,
        so the diffusion stage sees unit-variance latents."""
        vae = self.model.vae
        items = [holdout[(0, i)] for i in range(len(holdout))]
        images = torch.stack([item["pixels"] for item in items if isinstance(item, dict)]).to(self.accelerator.device)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.mode()).sample
        std = float(posterior.sample().std())
        vae.register_to_config(scaling_factor=1 / std if math.isfinite(std) and std > 0 else 1.0)
        self.holdout_psnr = psnr(reconstruction, images)
        if self.accelerator.is_main_process:
            print(f"held-out reconstruction PSNR {self.holdout_psnr:.2f} dB on {len(images)} images; "
                  f"latent std {std:.3f}, scaling_factor {vae.config.scaling_factor:.4f}")  # fmt: skip


class DiffusionStage(Stage):
    """Trains the UNet (and, from scratch, maybe the text encoder) to predict the noise (or v) added
    to the VAE's latents, conditioned on the captions; the VAE stays frozen."""

    def __init__(self, config: TrainConfig, model: LatentDiffusion, accelerator: Accelerator):
        super().__init__(config, model, accelerator)
        prediction = config.diffusion.prediction_type or model.scheduler.config.prediction_type
        model.scheduler = type(model.scheduler).from_config(model.scheduler.config, prediction_type=prediction)
        self.noise_schedule = DDPMScheduler.from_config(model.scheduler.config)
        model.vae.to(accelerator.device)
        model.text_encoder.to(accelerator.device)
        self.cache: CachedExamples | None = None

    @classmethod
    def check(cls, config: TrainConfig, dataset: Dataset) -> None:
        data, grounding = config.data, config.diffusion.grounding_loss
        folder = isinstance(dataset, CaptionedImages)
        if grounding and not (folder and any(boxes_file(image).is_file() for image, _ in dataset.entries)):
            raise ConfigError(
                f"diffusion.grounding_loss={grounding}: needs NAME.boxes.json files "
                f"beside the images of a folder dataset; {data.path} has none"
            )
        if data.cache_latents and not folder:
            raise ConfigError("data.cache_latents=true: for folder or metadata datasets, not tar shards")

    def data(self, dataset: Dataset) -> Dataset:
        data = self.config.data
        if not data.cache_latents:
            return dataset
        cache_text, folder = not self.config.diffusion.train_text_encoder, Path(data.cache_dir).expanduser()
        with self.accelerator.main_process_first():  # the main process writes, the others then read
            path = build_cache(dataset, self.model, cache_text, folder, self.accelerator.device)
        self.cache = load_cache(path)
        return self.cache

    def trained(self) -> list[nn.Module]:
        model, diffusion = self.model, self.config.diffusion
        trained = [model.unet] + ([model.text_encoder] if diffusion.train_text_encoder else [])
        if self.config.steps.gradient_checkpointing:
            model.unet.gradient_checkpointing = True
            if diffusion.train_text_encoder:
                model.text_encoder.gradient_checkpointing_enable()
        for module in trained:
            module.requires_grad_(True).train()
        return trained

    def loss(self, batch: dict, modules: list[nn.Module]) -> Tensor:
        diffusion = self.config.diffusion
        unet, text_encoder = modules[0], modules[1] if len(modules) > 1 else self.model.text_encoder
        latents = self._latents(batch)
        dropped = torch.rand(len(batch["captions"])) < diffusion.caption_dropout
        captions = ["" if drop else caption for caption, drop in zip(batch["captions"], dropped, strict=True)]
        if self.cache is not None and self.cache.empty_text is not None:  # text cached too
            text = torch.where(dropped[:, None, None], self.cache.empty_text, batch["text"])
            text = text.to(self.accelerator.device)
        else:
            with torch.set_grad_enabled(diffusion.train_text_encoder):
                text = encode_prompts(self.model.tokenizer, text_encoder, captions)
        weighting = dict(
            snr_gamma=diffusion.snr_gamma,
            noise_offset=diffusion.noise_offset,
            high_noise_bias=diffusion.high_noise_bias,
        )
        if not (diffusion.grounding_loss and batch.get("boxes")):
            return diffusion_loss(unet, self.noise_schedule, latents, text, **weighting)
        targets = grounding_targets(self.model.tokenizer, captions, batch["boxes"], tuple(latents.shape[-2:]))
        layers: list[Tensor] = []
        with capture_attention_probs(unet, lambda _, probs: layers.append(probs)):
            loss = diffusion_loss(unet, self.noise_schedule, latents, text, **weighting)
        return loss + diffusion.grounding_loss * grounding_loss(layers, targets)

    def _latents(self, batch: dict) -> Tensor:
        """Scaled latents of the batch's images: drawn from the cached posterior, or encoded now."""
        device = self.accelerator.device
        if self.cache is None:
            with torch.no_grad():
                return images_to_latents(self.model.vae, batch["pixels"].to(device))
        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        return (mean + std * torch.randn_like(mean)) * self.model.vae.config.scaling_factor

    def finish(self) -> None:
        validation = self.config.validation  # sample.py's defaults for this model: what validation used
        self.model.sampling = SamplingDefaults(validation.steps, validation.guidance_scale)


STAGES: dict[str, type[Stage]] = {"autoencoder": AutoencoderStage, "diffusion": DiffusionStage}
