"""The VAE between pixels and latents: diffusers' AutoencoderKL, with SD's latent scaling.

The UNet works on latents multiplied by the VAE's `scaling_factor` (0.18215 for SD 1.x/2.x),
which brings them to roughly unit variance, the scale the noise schedule assumes.
"""

from diffusers import AutoencoderKL
from torch import Tensor


def images_to_latents(vae: AutoencoderKL, images: Tensor, mean: bool = False) -> Tensor:
    """(batch, 3, H, W) images in [-1, 1] -> (batch, latent_channels, H/f, W/f) scaled latents,
    sampled from the encoder's Gaussian, or its mean (no randomness: image-to-image starts there)."""
    posterior = vae.encode(images).latent_dist
    return (posterior.mode() if mean else posterior.sample()) * vae.config.scaling_factor


def latents_to_images(vae: AutoencoderKL, latents: Tensor) -> Tensor:
    """Scaled latents -> images in [-1, 1] (not clamped; the caller decides)."""
    return vae.decode(latents / vae.config.scaling_factor).sample


def downsampling_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent along each side: 2 per downsampling stage (8 for SD's four-block VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
