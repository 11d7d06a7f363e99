"""The training loop: one stage (autoencoder or diffusion) of one model on one dataset, driven by
Accelerate, so the same code runs on a CPU, a GPU, several GPUs or several nodes
(`accelerate launch train.py ...` or `torchrun ... train.py ...`)."""

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldm.data.buckets import BucketBatchSampler
from ldm.data.datasets import (
    CaptionedImages,
    EpochSampler,
    ImageOptions,
    TarShards,
    check_usable,
    collate,
    open_dataset,
)
from ldm.errors import ConfigError, UserError
from ldm.files import remove_stale_partials, writing
from ldm.model import LatentDiffusion
from ldm.train.checkpoints import (
    checkpoints_dir,
    completed,
    find_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
    step_of,
)
from ldm.train.config import TrainConfig, save_config
from ldm.train.controlnet import ControlNetStage
from ldm.train.stages import AutoencoderStage, DiffusionStage, Draw, LoraStage, Stage, TextualInversionStage

logger = logging.getLogger(__name__)
# (EMA model, step, device, what the stage adds: Stage.validation_options) -> a grid
Validate = Callable[[LatentDiffusion, int, torch.device, dict], Image.Image]
STAGES: dict[str, type[Stage]] = {
    "autoencoder": AutoencoderStage,
    "diffusion": DiffusionStage,
    "lora": LoraStage,
    "textual_inversion": TextualInversionStage,
    "controlnet": ControlNetStage,
}


class TrainingDiverged(UserError):
    """The loss or a weight became NaN or infinite (a learning rate too high, most often); one line."""


class Progress:
    """The step counter, saved in checkpoints beside the models and optimizer."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


class Trainer:
    def __init__(self, config: TrainConfig, validate: Validate | None = None, draw: Draw | None = None):
        """`validate` draws the validation grid, `draw` DreamBooth's class images (both from train.py)."""
        self.config, self.validate, self.draw = config, validate, draw
        self.output = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.steps.mixed_precision,
            gradient_accumulation_steps=config.steps.gradient_accumulation,
            log_with=None if config.report_to == "none" else config.report_to,
            project_dir=str(self.output / "logs"),
            # Several processes and no GPU (torchrun on CPUs): Accelerate needs telling to use gloo.
            cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        )
        self.skipped: dict[str, str] = {}  # bad file -> why, each counted once
        self.losses: list[float] = []  # per optimizer step, on this process: what tests and summaries read

    def run(self) -> LatentDiffusion:
        config, accelerator = self.config, self.accelerator
        checkpoint = self._check_before_work()
        dataset = self._dataset()
        set_seed(config.seed)  # the same initial weights on every process
        self.model = build_model(config)
        self.stage = STAGES[config.stage](config, self.model, accelerator, self.draw)
        self.dataset = self.stage.data(dataset)
        modules = self.stage.trained()
        optimizer = self._optimizer(modules)
        lr_scheduler = get_scheduler(
            config.optim.lr_scheduler,
            optimizer,
            num_warmup_steps=config.optim.warmup_steps * accelerator.num_processes,
            num_training_steps=config.steps.max * accelerator.num_processes,
        )
        *self.wrapped, optimizer, lr_scheduler = accelerator.prepare(*modules, optimizer, lr_scheduler)
        # Every trained weight (UNet and a jointly trained text encoder): what the EMA averages.
        # Listed once, not rebuilt each step (1.7 ms a step for the demo model's 394 tensors).
        self.trained_parameters = [p for m in self.wrapped for p in trainable(accelerator.unwrap_model(m))]
        self.ema = None
        if config.ema_decay:  # foreach: one kernel per update, not one per tensor
            self.ema = EMAModel(self.trained_parameters, decay=config.ema_decay, foreach=True)
        self.progress = Progress()
        accelerator.register_for_checkpointing(self.progress, *([self.ema] if self.ema else []))
        accelerator.register_save_state_pre_hook(without_frozen_weights)
        self.base_grid = None  # fine-tuning: the pretrained model's pictures, beside every validation grid
        if self.validate and config.model.pretrained and accelerator.is_main_process:
            self.base_grid = self.validate(self.model, 0, accelerator.device, {})  # before any weight changes
            self._save_grid(self.base_grid, "base.png")
        if checkpoint:  # a checkpoint without the frozen weights loads around them
            whole = all(p.requires_grad for m in self.wrapped for p in m.parameters())
            accelerator.load_state(str(checkpoint), strict=whole)
            logger.info("resumed from %s at step %d", checkpoint, step_of(checkpoint))
        else:
            set_seed(config.seed, device_specific=True)  # different noise and dropout on every process
        if accelerator.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output / "config.yaml")
        accelerator.init_trackers("train")
        self._loop(optimizer, lr_scheduler)
        return self._finish()

    def _check_before_work(self) -> Path | None:
        """What the recipe alone cannot tell (TrainConfig checked that): the device, the output folder,
        the checkpoint to resume from (returned)."""
        if self.config.optim.use_8bit_adam and self.accelerator.device.type != "cuda":
            raise ConfigError("optim.use_8bit_adam=true: needs a CUDA device (bitsandbytes)")
        if (self.output / STAGES[self.config.stage].result(self.config)).exists():
            raise ConfigError(f"output_dir={str(self.output)!r} already holds a trained model; choose a new one")
        if self.accelerator.is_main_process:  # what a killed run left half-written
            remove_partial_checkpoints(self.output)
            remove_stale_partials(self.output)
        self.accelerator.wait_for_everyone()
        if not self.config.checkpoint.resume and completed(checkpoints_dir(self.output)):
            raise ConfigError(
                f"output_dir={str(self.output)!r} holds checkpoints: continue with checkpoint.resume=latest, "
                "or choose a new output_dir"
            )
        return find_checkpoint(self.output, self.config.checkpoint.resume) if self.config.checkpoint.resume else None

    def _dataset(self) -> CaptionedImages | TarShards:
        data, accelerator = self.config.data, self.accelerator
        stage = STAGES[self.config.stage]
        options = ImageOptions(data.resolution, data.center_crop, data.random_flip, self.config.seed, data.upscale,
                               self.config.loss.masked, stage.READS_CONTROLS)  # fmt: skip
        dataset = open_dataset(
            data.path, options, data.caption_column, accelerator.process_index, accelerator.num_processes,
            data.caption_extension,
        )  # fmt: skip
        for source, reason in getattr(dataset, "skipped", {}).items():  # found before the first step
            self.skipped[source] = reason
            if accelerator.is_main_process:
                print(f"skipping {source}: {reason}", file=sys.stderr)
        stage.check(self.config, dataset)
        if data.buckets and not isinstance(dataset, CaptionedImages):
            raise ConfigError("data.buckets=true: for folder or metadata datasets, not tar shards")
        instance_prompt = self.config.dreambooth.instance_prompt
        if instance_prompt:  # DreamBooth: one caption for every image (a folder dataset: checked)
            dataset = CaptionedImages([(image, instance_prompt) for image, _ in dataset.entries], options)
        check_usable(dataset)
        return dataset

    def _optimizer(self, modules: list[torch.nn.Module]) -> torch.optim.Optimizer:
        optim = self.config.optim
        text_lr = optim.learning_rate if optim.text_encoder_lr is None else optim.text_encoder_lr
        text_encoders = [encoder for _, encoder in self.model.text_encoders()]
        parameters = [  # only what trains: a LoRA's adapters, not the frozen weights around them
            {"params": trainable(m), "lr": text_lr if m in text_encoders else optim.learning_rate} for m in modules
        ]
        options = dict(lr=optim.learning_rate, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
        if not optim.use_8bit_adam:
            # One fused kernel for all parameters: 10 ms a step instead of 52 for the demo model on a CPU.
            return torch.optim.AdamW(parameters, **options, fused=self.accelerator.device.type in ("cpu", "cuda"))
        import bitsandbytes  # present: TrainConfig checked

        return bitsandbytes.optim.AdamW8bit(parameters, **options)

    def _loader(self) -> DataLoader:
        """Resumes at the exact item the interrupted run would have read next."""
        steps, accelerator = self.config.steps, self.accelerator
        consumed = self.progress.step * steps.batch_size * steps.gradient_accumulation
        options = dict(batch_size=steps.batch_size, collate_fn=collate, num_workers=self.config.data.num_workers)
        options["generator"] = torch.Generator().manual_seed(
            self.config.seed
        )  # not the global RNG: resuming must not shift it
        if getattr(self.dataset, "sizes", None):  # aspect-ratio buckets (cached or not)
            batches = BucketBatchSampler(
                self.dataset.sizes, steps.batch_size, self.config.seed, accelerator.process_index,
                accelerator.num_processes, self.progress.step * steps.gradient_accumulation,
            )  # fmt: skip
            options.pop("batch_size")
            return DataLoader(self.dataset, batch_sampler=batches, **options)
        if not isinstance(self.dataset, TarShards):
            sampler = EpochSampler(
                len(self.dataset), self.config.seed, accelerator.process_index, accelerator.num_processes, consumed
            )
            return DataLoader(self.dataset, sampler=sampler, **options)
        self.dataset.skip = consumed
        return DataLoader(self.dataset, **options)

    def _loop(self, optimizer, lr_scheduler) -> None:
        config, accelerator = self.config, self.accelerator
        bar = tqdm(total=config.steps.max, initial=self.progress.step, disable=not accelerator.is_main_process)
        bar.set_description(f"{config.stage} stage")
        try:
            for batch in self._loader():
                if self.progress.step >= config.steps.max:
                    break
                self._train_on(batch, optimizer, lr_scheduler, bar)
        finally:
            bar.close()  # before any error line: the bar is not redrawn after it

    def _train_on(self, batch: dict, optimizer, lr_scheduler, bar: tqdm) -> None:
        """One batch: its loss (refused if not finite), the backward pass, and an optimizer step once
        the gradients are accumulated."""
        config, accelerator = self.config, self.accelerator
        for item in batch["skipped"]:
            if item.source not in self.skipped:  # once per file, though every epoch meets it
                self.skipped[item.source] = item.reason
                bar.write(f"skipping {item.source}: {item.reason}", file=sys.stderr)  # above the bar, not in it
        if not batch["captions"]:
            return
        with accelerator.accumulate(*self.wrapped):
            loss = self.stage.loss(batch, self.wrapped)
            self._refuse_non_finite([accelerator.gather(loss.detach())], "the loss", self.progress.step + 1)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                parameters = [p for group in optimizer.param_groups for p in group["params"]]
                accelerator.clip_grad_norm_(parameters, config.optim.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            self._after_step(float(accelerator.gather(loss.detach()).mean()), lr_scheduler.get_last_lr()[0], bar)

    def _after_step(self, loss: float, lr: float, bar: tqdm) -> None:
        config, accelerator = self.config, self.accelerator
        self.progress.step += 1
        step = self.progress.step
        self.losses.append(loss)
        if self.ema:
            self.ema.step(self.trained_parameters)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if step % config.log_every == 0:
            accelerator.log({"loss": loss, "lr": lr}, step=step)
        if step % config.checkpoint.every == 0 or step == config.steps.max:
            self._refuse_non_finite(self.trained_parameters, "a trained weight", step)
            save_checkpoint(accelerator, self.output, step, config.checkpoint.keep)
        if self.validate and step % config.validation.every == 0 and accelerator.is_main_process:
            self._validation(step)

    def _refuse_non_finite(self, tensors: list[torch.Tensor], what: str, step: int) -> None:
        """Stop at the first NaN or infinity (every process sees the same gathered loss and weights):
        nothing non-finite is trained on or saved; the last checkpoint written stays the last good one."""
        if all(torch.isfinite(t).all() for t in tensors):
            return
        last = completed(checkpoints_dir(self.output))
        kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written"
        raise TrainingDiverged(
            f"step {step}: {what} is not finite (NaN or infinity); stopped, {kept}. "
            f"Lower optim.learning_rate (now {self.config.optim.learning_rate:g})"
        )

    def _validation(self, step: int) -> None:
        """Sample with the EMA weights, save the grid (fine-tuning: the base model's to its left),
        log it; then back to training."""
        if self.ema:
            self.ema.store(self.trained_parameters)
            self.ema.copy_to(self.trained_parameters)
        with self.stage.validation_options() as options:
            grid = self.validate(self.model, step, self.accelerator.device, options)
        if self.ema:
            self.ema.restore(self.trained_parameters)
        if self.base_grid is not None:
            grid = side_by_side(self.base_grid, grid)
        self._save_grid(grid, f"step-{step:08d}.png")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid.convert("RGB")), step, dataformats="HWC")

    def _save_grid(self, grid: Image.Image, name: str) -> None:
        folder = self.output / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        with writing(folder / name, replace=True) as partial:  # base.png is drawn again on resuming
            grid.save(partial, format="PNG")

    def _finish(self) -> LatentDiffusion:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        total = torch.tensor(len(self.skipped), device=accelerator.device)
        skipped = int(accelerator.reduce(total, reduction="sum"))
        if self.ema:
            self.ema.copy_to(self.trained_parameters)
        for module in self.wrapped:
            module.eval()
        self.stage.finish()
        if accelerator.is_main_process:
            self.stage.save(self.output)
            reasons = " (each named above)" if skipped else ""
            print(f"trained {self.progress.step} steps; skipped {skipped} bad file(s){reasons}")
        accelerator.end_training()
        return self.model


def build_model(config: TrainConfig) -> LatentDiffusion:
    """From a preset (random weights) or a pretrained model; the VAE maybe from an earlier stage."""
    if config.model.pretrained:
        model = LatentDiffusion.load(config.model.pretrained)
    else:
        model = LatentDiffusion.from_preset(config.model.preset)
    if model.is_refiner:
        raise ConfigError(f"model: {config.model.pretrained or config.model.preset} is an SDXL refiner; "
                          "training a refiner is not built yet")  # fmt: skip
    if config.model.vae:
        model.vae = LatentDiffusion.load(config.model.vae).vae
    return model


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def without_frozen_weights(models: list[torch.nn.Module], weights: list[dict], folder: str) -> None:
    """Checkpoints keep what trains: a LoRA run's adapters, not the frozen model around them."""
    for i, model in enumerate(models):
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        weights[i] = {key: value for key, value in weights[i].items() if key not in frozen}


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 4) -> Image.Image:
    """Two grids in one picture, a dark gap between: before (the base model) and after."""
    both = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (40, 40, 40))
    both.paste(left.convert("RGB"), (0, 0))
    both.paste(right.convert("RGB"), (left.width + gap, 0))
    return both
