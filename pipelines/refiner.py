"""SDXL's base + refiner ensemble (the SDXL paper's "ensemble of expert denoisers"): the base model
runs the noisiest steps, down to the switch (0.8: the first 80% of the noise schedule's 1000
timesteps), and hands its still-noisy latents to the refiner, which runs the rest with its own
text encoder, UNet and conditioning. The base's VAE decodes the result.

Matched against diffusers 0.42.1: `StableDiffusionXLPipeline(denoising_end=switch,
output_type="latent")`, then `StableDiffusionXLImg2ImgPipeline(denoising_start=switch,
image=latents)` (pipeline_stable_diffusion_xl.py, `__call__`; pipeline_stable_diffusion_xl_img2img.py,
`get_timesteps` and `_get_add_time_ids`).
"""

from torch import Tensor

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the refiner's time ids, as diffusers' defaults


def switch_timestep(scheduler, switch: float) -> int:
    """The timestep where the base hands over: the base runs timesteps at or above it."""
    total = scheduler.config.num_train_timesteps
    return int(round(total - switch * total))


def refiner_timesteps(scheduler, cutoff: int) -> Tensor:
    """The refiner's share of its scheduler's timesteps, those below the cutoff; a second-order
    scheduler's share is made odd so it never stops between a step's two evaluations."""
    count = int((scheduler.timesteps < cutoff).sum())
    if scheduler.order == 2 and count % 2 == 0:
        count += 1
    start = len(scheduler.timesteps) - count
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]
