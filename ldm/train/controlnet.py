"""stage=controlnet: a ControlNet (ldm/controlnet.py) trained on a frozen model, as the paper and
diffusers' examples/controlnet/train_controlnet.py train one.

It starts as a copy of the model's UNet encoder with a fresh conditioning embedding and zero convs
(ControlNet.from_unet), so the first step draws what the model alone draws. Each batch: the
diffusion loss of the frozen UNet with the ControlNet's residuals added, the ControlNet reading
the batch's control images (NAME_control.png beside NAME.png; ldm/data/datasets.py). Only the
ControlNet trains and only it is saved: OUTPUT_DIR/controlnet, a diffusers ControlNetModel folder.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import Dataset

from ldm.autoencoder import downsampling_factor
from ldm.controlnet import ControlNet
from ldm.data.datasets import CaptionedImages
from ldm.errors import ConfigError
from ldm.model import DTYPES, LatentDiffusion
from ldm.train.config import TrainConfig
from ldm.train.stages import DiffusionStage, Draw

SINGLE_FILE = "controlnet.safetensors"  # save_single_file: true, the original layout the web UIs read


class ControlNetStage(DiffusionStage):
    """Trains a ControlNet for the frozen model with the diffusion loss."""

    RESULT = "controlnet"
    READS_CONTROLS = True

    @classmethod
    def check(cls, config: TrainConfig, dataset: Dataset) -> None:
        super().check(config, dataset)
        if isinstance(dataset, CaptionedImages) and not dataset.controls:
            raise ConfigError(
                f"stage=controlnet: no image in {config.data.path} has a control image (NAME_control.png beside "
                "NAME.png, or a conditioning_image column in metadata.jsonl/.csv)"
            )

    def __init__(self, config: TrainConfig, model: LatentDiffusion, accelerator: Accelerator, draw: Draw | None = None):
        super().__init__(config, model, accelerator, draw)
        if model.unet.config.in_channels != model.vae.config.latent_channels:
            raise ConfigError(f"stage=controlnet: {config.model.pretrained} is an inpainting model; train a "
                              "ControlNet on its text-to-image model")  # fmt: skip

    def trained(self) -> list[nn.Module]:
        """The frozen model stays in fp32 (the validation sampler runs the ControlNet in the UNet's
        precision, so a half-precision UNet would halve the ControlNet's weights there)."""
        self.controlnet = ControlNet.from_unet(self.model.unet, downsampling_factor(self.model.vae))
        if self.config.steps.gradient_checkpointing:
            self.model.unet.gradient_checkpointing = self.controlnet.gradient_checkpointing = True
        return [self.controlnet.to(self.accelerator.device).requires_grad_(True).train()]

    def _unet(self, modules: list[nn.Module], batch: dict) -> Callable[..., Tensor]:
        """The frozen UNet with the ControlNet's residuals (modules[0], as Accelerate wrapped it) added,
        the ControlNet reading the batch's control images at scale 1."""
        controlnet, image, unet = modules[0], batch["control"].to(self.accelerator.device), self.model.unet

        def controlled(latents: Tensor, timesteps: Tensor, text: Tensor, pooled=None, time_ids=None) -> Tensor:
            control = controlnet(latents, timesteps, text, image, 1.0, pooled, time_ids)
            return unet(latents, timesteps, text, pooled, time_ids, control=control)

        return controlled

    @contextmanager
    def validation_options(self) -> Iterator[dict]:
        """The ControlNet as it is now (the EMA's weights, when kept), in eval mode while it draws."""
        self.controlnet.eval()
        try:
            yield {"controlnet": self.controlnet}
        finally:
            self.controlnet.train()

    def finish(self) -> None:
        pass  # the base model's sampling defaults stay as they were

    def save(self, output: Path) -> None:
        """A diffusers ControlNetModel folder (and, asked for, the original single file)."""
        self.controlnet.to(DTYPES[self.config.save_precision])
        self.controlnet.save(output / self.RESULT)
        if self.config.save_single_file:
            self.controlnet.save_single_file(output / SINGLE_FILE)
