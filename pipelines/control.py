"""ControlNets at sampling time: each unit is a ControlNet, its control image, a scale and the part
of the steps it acts in; their residuals are summed and added to the UNet's skips.

As diffusers' StableDiffusionControlNetPipeline (pipelines/controlnet/pipeline_controlnet.py,
0.42.1) runs them, guess mode off: the control image is resized to the output size and read in
[0, 1]; under classifier-free guidance the ControlNet sees both halves of the batch with the same
image; unit k acts at step i of n when not (i / n < start or (i + 1) / n > end) (its
`controlnet_keep`); several ControlNets add up (MultiControlNetModel). With a 9-channel inpainting
UNet the ControlNet reads the 4 latent channels only, as the inpainting ControlNet pipeline does.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm.controlnet import ControlNet
from pipelines.choices import CANNY_THRESHOLDS
from pipelines.settings import GenerationError


@dataclass(frozen=True)
class Control:
    """One ControlNet unit of a run."""

    controlnet: ControlNet
    image: Image.Image  # the control image as given (edges, a layout ...), any size
    scale: float = 1.0
    start: float = 0.0  # the fraction of the steps where it starts acting
    end: float = 1.0  # and where it stops

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= 1:
            raise GenerationError(f"control start={self.start}, end={self.end}: need 0 <= start < end <= 1")
        if not self.scale >= 0:
            raise GenerationError(f"control scale={self.scale}: must be 0 or more")


def preprocess(image: Image.Image, module: str) -> Image.Image:
    """The control image a ControlNet reads: the image itself, or its Canny edges (OpenCV's, with
    sd-webui-controlnet's default thresholds), white on black in three channels."""
    if module == "none":
        return image
    import cv2  # opencv-python-headless: loaded only when an edge map is asked for

    edges = cv2.Canny(np.asarray(image.convert("RGB")), *CANNY_THRESHOLDS)
    return Image.fromarray(edges).convert("RGB")


def control_pixels(image: Image.Image, width: int, height: int) -> Tensor:
    """(1, 3, height, width) in [0, 1]: the image in RGB, resized to the output size (Lanczos, as
    diffusers' VaeImageProcessor resizes a PIL image)."""
    image = image.convert("RGB").resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


class ControlledUNet:
    """The UNet with the units active at one step: called as the UNet is, it adds their residuals."""

    def __init__(self, unet: Callable[..., Tensor], units: tuple[tuple[Control, Tensor], ...], step: int, steps: int):
        self.unet = unet
        self.units = [(c, image) for c, image in units if not (step / steps < c.start or (step + 1) / steps > c.end)]

    def __call__(
        self, x: Tensor, t: Tensor, text: Tensor, pooled: Tensor | None = None, time_ids: Tensor | None = None
    ) -> Tensor:
        control = None
        for unit, image in self.units:
            latents = x[:, : unit.controlnet.config.unet.in_channels]
            images = image.to(x.device, x.dtype).expand(len(x), -1, -1, -1)
            down, mid = unit.controlnet(latents, t, text, images, unit.scale, pooled, time_ids)
            if control is None:
                control = (down, mid)
            else:
                control = ([a + b for a, b in zip(control[0], down, strict=True)], control[1] + mid)
        return self.unet(x, t, text, pooled, time_ids, control=control)
