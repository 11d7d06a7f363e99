"""The two training losses of a latent diffusion model, written as their equations."""

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from torch import Tensor, nn

from ldm.unet import UNet


def diffusion_loss(
    unet: UNet,
    noise_schedule: DDPMScheduler,
    latents: Tensor,
    text: Tensor,
    min_snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    high_noise_bias: float = 1.0,
    weights: Tensor | None = None,
    added: dict[str, Tensor] | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Noise the latents to a random timestep, x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, and regress the UNet's
    output on its target: ε for `epsilon`, v = √ᾱ_t ε - √(1-ᾱ_t) x_0 for `v_prediction`.

    noise_offset adds a per-channel constant to ε, which lets the model learn very dark and very
    bright images; high_noise_bias draws the noisiest quarter of timesteps that many times as often
    as the rest (diffusers' "later" timestep bias), where the layout is decided; min_snr_gamma weights
    each timestep by min(SNR, γ)/SNR (Hang et al., 2023, "Min-SNR"); `weights` weights each sample
    (DreamBooth's prior-preservation loss: the class images at prior_loss_weight). `added` is SDXL's
    added conditioning, passed to the UNet: the pooled text and the size ids. `mask` (B, 1, H, W)
    in [0, 1], at any size, weights each latent pixel's error by its area average at latent size,
    and the mean is still taken over every pixel, as kohya's apply_masked_loss (48d368fa) does."""
    batch = latents.shape[0]
    noise = torch.randn_like(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(batch, latents.shape[1], 1, 1, device=latents.device)
    steps = noise_schedule.config.num_train_timesteps
    if high_noise_bias == 1.0:
        timesteps = torch.randint(0, steps, (batch,), device=latents.device)
    else:
        odds = torch.ones(steps)
        odds[steps - steps // 4 :] = high_noise_bias
        timesteps = torch.multinomial(odds, batch, replacement=True).to(latents.device)
    noisy = noise_schedule.add_noise(latents, noise, timesteps)
    if noise_schedule.config.prediction_type == "v_prediction":
        target = noise_schedule.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy, timesteps, text, **(added or {}))
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if mask is not None:
        error = error * F.interpolate(mask.float(), size=error.shape[-2:], mode="area")
    per_sample = error.mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = weights * per_sample
    if min_snr_gamma is None:
        return per_sample.mean()
    alphas = noise_schedule.alphas_cumprod.to(latents.device)[timesteps]
    snr = alphas / (1 - alphas)
    if noise_schedule.config.prediction_type == "v_prediction":
        weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1)  # the v target already carries SNR + 1
    else:  # a zero-terminal-SNR schedule's last step has SNR 0: weight 1 there, not 0/0 (as diffusers' scripts)
        weight = torch.where(snr == 0, 1.0, torch.clamp(snr, max=min_snr_gamma) / snr)
    return (weight * per_sample).mean()


class ReconstructionObjective(nn.Module):
    """The autoencoder stage's loss as a module, so DDP can wrap it (DDP only syncs `forward`):
    reconstruction (L1 or MSE) through a sampled latent, plus kl_weight · KL(q(z|x) ‖ N(0, I)),
    which keeps the latent space smooth enough to diffuse in."""

    def __init__(self, vae: AutoencoderKL, kind: str, kl_weight: float):
        super().__init__()
        self.vae, self.kind, self.kl_weight = vae, kind, kl_weight

    def forward(self, images: Tensor) -> Tensor:
        posterior = self.vae.encode(images).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        distance = F.l1_loss if self.kind == "l1" else F.mse_loss
        return distance(reconstruction.float(), images.float()) + self.kl_weight * posterior.kl().mean()


def psnr(reconstruction: Tensor, images: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(reconstruction.float().clamp(-1, 1), images.float())
    return float(10 * torch.log10(4 / mse))
