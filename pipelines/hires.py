"""Hires fix, as AUTOMATIC1111's `StableDiffusionProcessingTxt2Img` does it (modules/processing.py,
`sample` and `sample_hr_pass`): draw at the asked size, upscale, then run image-to-image at the
larger size, so the large picture keeps the small one's composition.

- `latent`: the latents are resized (bilinear, no antialiasing: A1111's "Latent" mode);
  `lanczos`: the picture is decoded, resized with Lanczos, and encoded again (A1111's "Lanczos").
- The larger size is int(side x scale), down to the VAE's multiple (A1111 floors the latent size).
- The second pass runs `hires_steps` steps (the first pass's count when not given) at strength
  `hires_denoise`: A1111 stretches the schedule to steps / denoise and runs the last `steps` of it
  (`setup_img2img_steps`); we run the same count, from a schedule of the smallest length that gives
  it. Its noise is drawn afresh from each image's seed at the larger size, as A1111's `ImageRNG`.
"""

import math

import torch.nn.functional as F
from torch import Tensor

DEFAULT_DENOISE = 0.7  # A1111's txt2img default denoising strength


def hires_size(height: int, width: int, scale: float, multiple: int) -> tuple[int, int]:
    """The second pass's (height, width)."""
    return tuple(int(side * scale) // multiple * multiple for side in (height, width))


def schedule_length(steps: int, denoise: float) -> int:
    """The shortest schedule whose last int(length x denoise) steps are `steps` (image-to-image runs
    that many of it)."""
    length = max(steps, math.ceil(steps / denoise))
    while int(length * denoise) < steps:  # float rounding: 15 / 0.7 * 0.7 is 14.999...
        length += 1
    return length


def upscale_latents(latents: Tensor, height: int, width: int, factor: int) -> Tensor:
    return F.interpolate(latents, size=(height // factor, width // factor), mode="bilinear", antialias=False)
