"""The denoising UNet, state-dict compatible with diffusers' UNet2DConditionModel (SD 1.x/2.x)."""

from ldm.unet.config import UNetConfig
from ldm.unet.model import UNet

__all__ = ["UNet", "UNetConfig"]
