"""Training stages: what one kind of training trains, its loss on a batch, and what it leaves in the
model when it ends. The loop (loop.py) is the same for every stage: data order, accumulation, EMA,
checkpoints, validation. A new way to train (LoRA, DreamBooth) is a new stage here.

    Stage            trains                               loss
    AutoencoderStage the VAE                              reconstruction + KL (objectives.py)
    DiffusionStage   the UNet (and maybe the text encoders) ε or v regression (+ grounding)
    LoraStage        adapters on the UNet (and maybe text)  as DiffusionStage
    TextualInversionStage  a new word's vectors             as DiffusionStage
    ControlNetStage  a ControlNet (controlnet.py)          as DiffusionStage, the UNet frozen

SDXL trains as SD does, with its added conditioning: both text encoders (the pooled embedding
too) and each image's size ids (original size, crop, target; from its bucket and crop).
"""

import hashlib
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, inject_adapter_in_model
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from ldm.attention import capture_attention_probs
from ldm.autoencoder import images_to_latents
from ldm.data.buckets import bucketed, table
from ldm.data.captions import shuffle_tags
from ldm.data.datasets import CaptionedImages, boxes_file, has_mask
from ldm.embeddings import save_embedding
from ldm.errors import ConfigError
from ldm.files import writing
from ldm.lora import lora_file, merge_lora
from ldm.model import DTYPES, LatentDiffusion, SamplingDefaults, save_safetensors
from ldm.single_file import save_single_file
from ldm.text import encode_captions
from ldm.train.cache import CachedExamples, build_cache, load_cache
from ldm.train.config import TrainConfig
from ldm.train.grounding import grounding_loss, grounding_targets
from ldm.train.objectives import ReconstructionObjective, diffusion_loss, psnr
from ldm.train.textual_inversion import WordVectors, encode_with_word

logger = logging.getLogger(__name__)
Draw = Callable[[LatentDiffusion, list[str], int, torch.device], list[Image.Image]]  # image k: seed + k
CLASS_BATCH = 8
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}  # mixed precision -> the frozen weights' dtype
SINGLE_FILE = "model.safetensors"  # save_single_file: true


class Stage:
    """One kind of training of `model`. The loop calls, in order: `check` before the model is built,
    `data` and `trained` once, `loss` every batch (with the trained modules as Accelerate wrapped
    them), `finish` and `save`."""

    RESULT = "model"  # what `save` writes under output_dir
    READS_CONTROLS = False  # whether each item needs its control image (a ControlNet's training)

    @classmethod
    def result(cls, config: TrainConfig) -> str:
        """What `save` writes under output_dir (a run that finds it there stops before any work)."""
        return cls.RESULT

    @classmethod
    def check(cls, config: TrainConfig, dataset: Dataset) -> None:
        """What this stage needs of the data; ConfigError if it is not there."""

    def __init__(self, config: TrainConfig, model: LatentDiffusion, accelerator: Accelerator, draw: Draw | None = None):
        self.config, self.model, self.accelerator, self.draw = config, model, accelerator, draw
        for part in model.parts().values():
            part.requires_grad_(False).eval()

    def data(self, dataset: Dataset) -> Dataset:
        """The dataset to train on, once checked against what this stage needs."""
        return self._bucketed(dataset)

    def _bucketed(self, dataset: Dataset) -> Dataset:
        """With data.buckets, each image's aspect-ratio bucket; the table goes in the log."""
        data = self.config.data
        if not data.buckets:
            return dataset
        dataset = bucketed(dataset, data.resolution, data.bucket_step, data.upscale)
        if self.accelerator.is_main_process:
            logger.info("aspect-ratio buckets (width x height: images): %s", table(dataset.sizes))
        return dataset

    def trained(self) -> list[nn.Module]:
        """The modules this stage trains, put in training mode; the first is the one the EMA starts with."""
        raise NotImplementedError

    def loss(self, batch: dict, modules: list[nn.Module]) -> Tensor:
        raise NotImplementedError

    @contextmanager
    def validation_options(self) -> Iterator[dict]:
        """What the validation sampler draws with besides the model: nothing, but for textual
        inversion ({"embeddings": a folder}) and ControlNet ({"controlnet": the one training})."""
        yield {}

    def finish(self) -> None:
        """On every process, after the last step, with the EMA weights in place."""

    def save(self, output: Path) -> None:
        """On the main process: the trained model, in the recipe's precision (and as one file)."""
        for part in self.model.parts().values():
            part.to(DTYPES[self.config.save_precision])
        self.model.save(output / self.RESULT)
        if self.config.save_single_file:
            save_single_file(self.model, output / SINGLE_FILE)


class AutoencoderStage(Stage):
    """Trains the VAE on pixels; at the end, measures it on held-out images and sets its latent scale."""

    def data(self, dataset: Dataset) -> Dataset:
        self.holdout = None
        if not isinstance(dataset, CaptionedImages):
            return dataset
        count = min(self.config.autoencoder.holdout, len(dataset) - 1)
        self.holdout = CaptionedImages(dataset.entries[:count], dataset.options)
        return self._bucketed(CaptionedImages(dataset.entries[count:], dataset.options))

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

    def __init__(self, config: TrainConfig, model: LatentDiffusion, accelerator: Accelerator, draw: Draw | None = None):
        super().__init__(config, model, accelerator, draw)
        prediction = config.diffusion.prediction_type or model.scheduler.config.prediction_type
        model.scheduler = type(model.scheduler).from_config(model.scheduler.config, prediction_type=prediction)
        self.noise_schedule = DDPMScheduler.from_config(model.scheduler.config)
        model.vae.to(accelerator.device)
        model.unet.to(accelerator.device)  # Accelerate moves it again when it trains; frozen, it is run here
        for _, encoder in model.text_encoders():
            encoder.to(accelerator.device)
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
        if config.loss.masked and folder and not any(has_mask(image) for image, _ in dataset.entries):
            raise ConfigError(f"loss.masked=true: no image in {data.path} has an alpha channel or a NAME_mask.png")
        dreambooth = config.dreambooth
        if (dreambooth.instance_prompt or dreambooth.class_prompt) and not folder:
            raise ConfigError("dreambooth: for folder or metadata datasets, not tar shards")

    def data(self, dataset: Dataset) -> Dataset:
        data = self.config.data
        dataset = self._bucketed(self._dreambooth(dataset))
        if not data.cache_latents:
            return dataset
        cache_text, folder = not self.config.text_trains, Path(data.cache_dir).expanduser()
        with self.accelerator.main_process_first():  # the main process writes, the others then read
            path = build_cache(dataset, self.model, cache_text, folder, self.accelerator.device)
        self.cache = load_cache(path)
        return self.cache

    def _dreambooth(self, dataset: Dataset) -> Dataset:
        """Prior preservation: the class images added to the data, captioned by the class prompt."""
        class_prompt = self.config.dreambooth.class_prompt
        if class_prompt is None:
            return dataset
        class_entries = [(image, class_prompt) for image in self._class_images()]
        return CaptionedImages(dataset.entries + class_entries, dataset.options)

    def _class_images(self) -> list[Path]:
        """The base model's images of the class prompt: drawn into the class folder the first time
        (seeds 0, 1, ...; the main process draws, the others wait), reused after."""
        dreambooth = self.config.dreambooth
        folder = Path(dreambooth.class_dir or class_folder(self.config)).expanduser()
        with self.accelerator.main_process_first():
            have = sorted(folder.glob("*.png"))
            missing = dreambooth.class_images - len(have)
            if missing > 0 and self.accelerator.is_main_process:
                if self.draw is None:
                    raise ConfigError("dreambooth.class_prompt: drawing class images needs train.py's sampler")
                folder.mkdir(parents=True, exist_ok=True)
                logger.info("drawing %d class images of %r into %s", missing, dreambooth.class_prompt, folder)
                for start in range(len(have), dreambooth.class_images, CLASS_BATCH):
                    count = min(CLASS_BATCH, dreambooth.class_images - start)
                    images = self.draw(self.model, [dreambooth.class_prompt] * count, start, self.accelerator.device)
                    for offset, image in enumerate(images):
                        with writing(folder / f"{start + offset:05d}.png") as partial:
                            image.save(partial, format="PNG")
                have = sorted(folder.glob("*.png"))
        return have[: dreambooth.class_images]

    def trained(self) -> list[nn.Module]:
        model, diffusion = self.model, self.config.diffusion
        encoders = [encoder for _, encoder in model.text_encoders()]
        trained = [model.unet] + (encoders if diffusion.train_text_encoder else [])
        self._checkpointing()
        for module in trained:
            module.requires_grad_(True).train()
        return trained

    def _checkpointing(self) -> None:
        """Gradient checkpointing, when asked for, in the UNet and the text encoders if they train."""
        if self.config.steps.gradient_checkpointing:
            self.model.unet.gradient_checkpointing = True
            if self.config.text_trains:
                for _, encoder in self.model.text_encoders():
                    encoder.gradient_checkpointing_enable()

    def loss(self, batch: dict, modules: list[nn.Module]) -> Tensor:
        diffusion = self.config.diffusion
        unet, latents = self._unet(modules, batch), self._latents(batch)
        captions = batch["captions"]
        class_prompt = self.config.dreambooth.class_prompt
        weights = None
        if class_prompt is not None:  # prior preservation: a class image is known by its caption
            prior = self.config.dreambooth.prior_loss_weight
            weights = torch.tensor([prior if c == class_prompt else 1.0 for c in captions], device=latents.device)
        if self.config.data.shuffle_tags:
            captions = [shuffle_tags(caption, self.config.data.keep_tokens) for caption in captions]
        dropped = torch.rand(len(captions)) < diffusion.caption_dropout
        captions = ["" if drop else caption for caption, drop in zip(captions, dropped, strict=True)]
        text, pooled = self._text(batch, captions, dropped, modules)
        options = dict(
            min_snr_gamma=self.config.loss.min_snr_gamma,
            noise_offset=self.config.loss.noise_offset,
            high_noise_bias=diffusion.high_noise_bias,
            weights=weights,
            mask=batch["mask"].to(latents.device) if "mask" in batch else None,
        )
        if self.model.is_sdxl:  # the added conditioning: pooled text and the images' size ids
            options["added"] = {"pooled": pooled, "time_ids": batch["size_ids"].to(latents.device)}
        if not (diffusion.grounding_loss and batch.get("boxes")):
            return diffusion_loss(unet, self.noise_schedule, latents, text, **options)
        targets = grounding_targets(self.model.tokenizer, captions, batch["boxes"], tuple(latents.shape[-2:]))
        layers: list[Tensor] = []
        with capture_attention_probs(unet, lambda _, probs: layers.append(probs)):
            loss = diffusion_loss(unet, self.noise_schedule, latents, text, **options)
        return loss + diffusion.grounding_loss * grounding_loss(layers, targets)

    def _unet(self, modules: list[nn.Module], batch: dict) -> Callable[..., Tensor]:
        """The UNet the loss runs on `batch`: the trained one, as Accelerate wrapped it."""
        return modules[0]

    def _text(self, batch: dict, captions: list[str], dropped: Tensor, modules: list[nn.Module]) -> tuple:
        """(token embeddings, pooled or None) of the captions: from the cache (a dropped caption
        gets the empty caption's), or encoded now by the text encoders, as Accelerate wrapped them
        when they train (modules[1:])."""
        device, cache = self.accelerator.device, self.cache
        if cache is not None and cache.empty_text is not None:
            text = torch.where(dropped[:, None, None], cache.empty_text, batch["text"]).to(device)
            if cache.empty_pooled is None:
                return text, None
            return text, torch.where(dropped[:, None], cache.empty_pooled, batch["pooled"]).to(device)
        encoders = self.model.text_encoders()
        if len(modules) > 1:
            encoders = [(tokenizer, module) for (tokenizer, _), module in zip(encoders, modules[1:], strict=True)]
        with torch.set_grad_enabled(self.config.text_trains):
            return encode_captions(encoders, captions, self.model.is_sdxl)

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


class LoraStage(DiffusionStage):
    """Trains low-rank adapters (peft) on named modules of a pretrained model, with the diffusion
    loss; the base weights stay frozen and are not saved: the run's result is lora.safetensors."""

    RESULT = "lora.safetensors"

    def __init__(self, config: TrainConfig, model: LatentDiffusion, accelerator: Accelerator, draw: Draw | None = None):
        super().__init__(config, model, accelerator, draw)
        self.targets = {"unet": list(config.lora.targets)}
        if config.lora.text_encoder:  # both of SDXL's
            self.targets |= {part: list(config.lora.text_targets) for part in self.model.text_parts()}

    def trained(self) -> list[nn.Module]:
        """With mixed precision, the frozen UNet and text encoders are kept in its half precision (half
        the memory: SDXL's UNet takes 5.1 GB instead of 10.3) and only the adapters in fp32, as kohya's
        train_network.py and diffusers' LoRA scripts (cast_training_params) do. The VAE stays fp32."""
        lora, parts = self.config.lora, self.model.parts()
        half = HALF.get(self.config.steps.mixed_precision)
        for name, part in parts.items():
            if half is not None and name != "vae":
                part.to(half)
        for part, targets in self.targets.items():
            check_targets(parts[part], targets, f"lora.{'targets' if part == 'unet' else 'text_targets'}")
            adapter = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                     target_modules=targets)  # fmt: skip
            inject_adapter_in_model(adapter, parts[part])
            cast_training_params(parts[part], dtype=torch.float32)  # peft made the adapters in the weights' dtype
        trained = [parts[part] for part in self.targets]
        self._checkpointing()
        for module in trained:
            module.train()
        return trained

    def finish(self) -> None:
        pass  # the base model's sampling defaults stay as they were

    def save(self, output: Path) -> None:
        parts = self.model.parts()
        dtype = DTYPES[self.config.save_precision]
        adapters = {
            part: {key: value.to(dtype) for key, value in get_peft_model_state_dict(parts[part]).items()}
            for part in self.targets
        }
        tensors, metadata = lora_file(
            self.model, adapters, self.targets, self.config.lora.alpha, self.config.lora.format
        )
        save_safetensors(output / self.RESULT, tensors, metadata | self._training_metadata())
        if self.config.save_single_file:  # the base model with the file just written merged in
            merged = LatentDiffusion.load(self.config.model.pretrained)
            merge_lora(merged, output / self.RESULT)
            for part in merged.parts().values():
                part.to(dtype)
            save_single_file(merged, output / SINGLE_FILE)

    def _training_metadata(self) -> dict[str, str]:
        """kohya's `ss_` fields (train_network.py), as model browsers and web UIs read them."""
        config, unet = self.config, self.model.unet.config
        v2 = unet.cross_attention_dim == 1024
        v_prediction = self.noise_schedule.config.prediction_type == "v_prediction"
        version = f"sd_v{2 if v2 else 1}{'_v' if v_prediction else ''}"
        values = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": config.lora.rank,
            "ss_network_alpha": config.lora.alpha,
            "ss_network_dropout": config.lora.dropout,
            "ss_base_model_version": "sdxl_base_v1-0" if self.model.is_sdxl else version,  # kohya's names
            "ss_v2": v2,
            "ss_sd_model_name": Path(str(config.model.pretrained)).name,
            "ss_resolution": f"({config.data.resolution}, {config.data.resolution})",
            "ss_steps": config.steps.max,
            "ss_max_train_steps": config.steps.max,
            "ss_batch_size_per_device": config.steps.batch_size,
            "ss_gradient_accumulation_steps": config.steps.gradient_accumulation,
            "ss_learning_rate": config.optim.learning_rate,
            "ss_unet_lr": config.optim.learning_rate,
            "ss_text_encoder_lr": config.optim.text_encoder_lr if config.lora.text_encoder else None,
            "ss_lr_scheduler": config.optim.lr_scheduler,
            "ss_optimizer": "bitsandbytes.optim.AdamW8bit" if config.optim.use_8bit_adam else "torch.optim.AdamW",
            "ss_mixed_precision": config.steps.mixed_precision,
            "ss_seed": config.seed,
            "ss_noise_offset": config.loss.noise_offset,
            "ss_min_snr_gamma": config.loss.min_snr_gamma,
            # kohya's --masked_loss, by its name; kohya's train_network.py (48d368fa) writes no field for it
            "ss_masked_loss": config.loss.masked,
            "ss_caption_dropout_rate": config.diffusion.caption_dropout,
            "ss_cache_latents": config.data.cache_latents,
            "ss_output_name": Path(self.RESULT).stem,
            "ss_training_comment": "trained with ldm-toolkit (train.py, stage=lora)",
        }
        return {key: str(value) for key, value in values.items()}


class TextualInversionStage(DiffusionStage):
    """Learns a new word's vectors (textual inversion: Gal et al., 2022) with the diffusion loss; the
    whole model stays frozen and unsaved: the run's result is TOKEN.safetensors, A1111's format."""

    def __init__(self, config: TrainConfig, model: LatentDiffusion, accelerator: Accelerator, draw: Draw | None = None):
        super().__init__(config, model, accelerator, draw)
        self.token, self.file = str(config.textual_inversion.token), self.result(config)

    @classmethod
    def result(cls, config: TrainConfig) -> str:
        return f"{config.textual_inversion.token}.safetensors"

    @classmethod
    def check(cls, config: TrainConfig, dataset: Dataset) -> None:
        super().check(config, dataset)
        token = config.textual_inversion.token
        if isinstance(dataset, CaptionedImages) and not config.dreambooth.instance_prompt:
            captions = (c.read_text(encoding="utf-8", errors="replace") if isinstance(c, Path) and c.is_file()
                        else str(c) for _, c in dataset.entries)  # fmt: skip
            if not any(token in caption for caption in captions):
                raise ConfigError(f"textual_inversion.token={token!r}: no caption in {config.data.path} has it")
        elif config.dreambooth.instance_prompt and token not in config.dreambooth.instance_prompt:
            raise ConfigError(f"textual_inversion.token={token!r}: not in dreambooth.instance_prompt")

    def trained(self) -> list[nn.Module]:
        inversion = self.config.textual_inversion
        self.word = WordVectors(self.model.text_encoders(), inversion.init_word, inversion.vectors)
        return [self.word.to(self.accelerator.device).train()]

    def _unet(self, modules: list[nn.Module], batch: dict) -> Callable[..., Tensor]:
        return self.model.unet  # frozen: the gradient passes through it to the word's vectors

    def _text(self, batch: dict, captions: list[str], dropped: Tensor, modules: list[nn.Module]) -> tuple:
        vectors = modules[0]()
        return encode_with_word(self.model.text_encoders(), captions, self.model.is_sdxl, self.token, vectors)

    @contextmanager
    def validation_options(self) -> Iterator[dict]:
        """The word as it is now, in a folder of its own for the validation sampler."""
        with tempfile.TemporaryDirectory() as folder:
            save_embedding(Path(folder) / self.file, list(self.word.vectors))
            yield {"embeddings": Path(folder)}

    def finish(self) -> None:
        pass  # the base model's sampling defaults stay as they were

    def save(self, output: Path) -> None:
        dtype = DTYPES[self.config.save_precision]
        save_embedding(output / self.file, [vectors.to(dtype) for vectors in self.word.vectors])


def check_targets(module: nn.Module, targets: list[str], key: str) -> None:
    """Each target names at least one Linear or Conv2d layer, matched as peft matches names."""
    for target in targets:
        found = [m for name, m in module.named_modules() if name == target or name.endswith("." + target)]
        if not found:
            raise ConfigError(f"{key}: {target!r} names no module of this model")
        wrong = {type(m).__name__ for m in found if not isinstance(m, nn.Linear | nn.Conv2d)}
        if wrong:
            raise ConfigError(
                f"{key}: {target!r} names {', '.join(sorted(wrong))} layers; LoRA adapts Linear and Conv2d"
            )


def class_folder(config: TrainConfig) -> Path:
    """The default class-image folder: one per class prompt, base model and resolution."""
    key = f"{config.model.pretrained or config.model.preset}|{config.dreambooth.class_prompt}|{config.data.resolution}"
    return Path(config.data.cache_dir) / "class-images" / hashlib.sha256(key.encode()).hexdigest()[:16]
