"""The losses against their equations, with a stand-in UNet whose output we know."""

import pytest
import torch
from diffusers import DDPMScheduler

from ldm.train.checkpoints import completed
from ldm.train.objectives import diffusion_loss, psnr


class Recorder(torch.nn.Module):
    """Predicts zeros and remembers its inputs, so the loss is the mean square of the target."""

    def forward(self, noisy, timesteps, text):
        self.noisy, self.timesteps = noisy, timesteps
        return torch.zeros_like(noisy)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_target_is_the_noise_or_the_velocity(prediction_type):
    schedule = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )
    latents, unet = torch.randn(3, 4, 8, 8), Recorder()
    torch.manual_seed(0)
    loss = diffusion_loss(unet, schedule, latents, torch.zeros(3, 7, 8))
    torch.manual_seed(0)
    noise = torch.randn_like(latents)
    alpha = schedule.alphas_cumprod[unet.timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(unet.noisy, alpha.sqrt() * latents + (1 - alpha).sqrt() * noise)  # x_t
    target = noise if prediction_type == "epsilon" else alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    torch.testing.assert_close(loss, target.square().mean())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_each_sample_as_diffusers_and_kohya_do(prediction_type):
    """min(SNR, γ) / SNR for epsilon, min(SNR, γ) / (SNR + 1) for v-prediction (diffusers'
    train_text_to_image.py and kohya's apply_snr_weight)."""
    schedule = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )
    latents, unet = torch.randn(4, 4, 8, 8), Recorder()
    torch.manual_seed(1)
    loss = diffusion_loss(unet, schedule, latents, torch.zeros(4, 7, 8), min_snr_gamma=5.0)
    torch.manual_seed(1)
    noise = torch.randn_like(latents)
    alpha = schedule.alphas_cumprod[unet.timesteps]
    snr, a = alpha / (1 - alpha), alpha.view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        target, weight = noise, torch.clamp(snr, max=5.0) / snr
    else:
        target, weight = a.sqrt() * noise - (1 - a).sqrt() * latents, torch.clamp(snr, max=5.0) / (snr + 1)
    torch.testing.assert_close(loss, (weight * target.square().mean(dim=(1, 2, 3))).mean())


def test_min_snr_on_a_zero_terminal_snr_schedule_stays_finite():
    """The last timestep of a rescaled schedule has SNR 0: epsilon's weight there is 1, not 0/0."""
    schedule = DDPMScheduler(rescale_betas_zero_snr=True, num_train_timesteps=4)
    unet = Recorder()
    torch.manual_seed(0)
    loss = diffusion_loss(unet, schedule, torch.randn(64, 1, 2, 2), torch.zeros(64, 1, 1), min_snr_gamma=5.0)
    assert (unet.timesteps == 3).any() and torch.isfinite(loss)


def test_noise_offset_adds_a_constant_per_image_and_channel_to_the_noise():
    """kohya's and diffusers' noise offset: ε + offset · N(0, 1) drawn per (image, channel)."""
    schedule, unet = DDPMScheduler(), Recorder()
    latents = torch.randn(2, 3, 4, 4)
    torch.manual_seed(4)
    diffusion_loss(unet, schedule, latents, torch.zeros(2, 7, 8), noise_offset=0.1)
    torch.manual_seed(4)
    noise = torch.randn_like(latents) + 0.1 * torch.randn(2, 3, 1, 1)
    alpha = schedule.alphas_cumprod[unet.timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(unet.noisy, alpha.sqrt() * latents + (1 - alpha).sqrt() * noise)


def test_a_mask_weights_each_latent_pixel_by_its_area_average():
    """kohya's apply_masked_loss (library/custom_train_functions.py, 48d368fa): the mask, area-resized
    to the latents, multiplies the squared error, whose mean is still over every pixel."""
    schedule, unet = DDPMScheduler(), Recorder()
    latents = torch.randn(2, 4, 2, 2)
    mask = torch.zeros(2, 1, 16, 16)  # pixels: 8 x 8 per latent pixel
    mask[0, :, :, :8] = 1  # image 0: the left column of latent pixels
    mask[1, :, :4, 8:] = 1  # image 1: half of the top-right latent pixel
    torch.manual_seed(3)
    loss = diffusion_loss(unet, schedule, latents, torch.zeros(2, 7, 8), mask=mask)
    torch.manual_seed(3)
    noise = torch.randn_like(latents)
    weight = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[0.0, 0.5], [0.0, 0.0]]]])
    torch.testing.assert_close(loss, (noise.square() * weight).mean())


def test_high_noise_bias_draws_the_noisiest_quarter_that_many_times_as_often():
    schedule, unet = DDPMScheduler(), Recorder()
    torch.manual_seed(2)
    diffusion_loss(unet, schedule, torch.randn(4000, 1, 1, 1), torch.zeros(4000, 1, 1), high_noise_bias=3.0)
    noisiest = (unet.timesteps >= 750).float().mean()
    assert noisiest == pytest.approx(3 * 0.25 / (0.75 + 3 * 0.25), abs=0.03)  # a half, instead of a quarter
    assert unet.timesteps.min() < 10 and unet.timesteps.max() > 990


def test_psnr_of_a_known_error():
    images = torch.zeros(1, 3, 4, 4)
    assert psnr(images + 0.2, images) == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.04)).item(), rel=1e-5)


def test_only_finished_checkpoints_count(tmp_path):
    for name in ["step-00000010", "step-00000030", ".step-00000040.partial", "step-00000020", "notes"]:
        (tmp_path / name).mkdir()
    assert [p.name for p in completed(tmp_path)] == ["step-00000010", "step-00000020", "step-00000030"]


def test_sample_weights_scale_each_samples_loss():
    """DreamBooth's prior preservation weights the class images' samples by prior_loss_weight."""
    schedule = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents, text = torch.randn(2, 4, 8, 8), torch.zeros(2, 7, 8)

    def run(weights):
        torch.manual_seed(0)  # the same noise and timesteps each time
        return diffusion_loss(Recorder(), schedule, latents, text, weights=weights)

    whole = run(None)
    torch.testing.assert_close(run(torch.tensor([1.0, 0.0])) + run(torch.tensor([0.0, 1.0])), whole)
    torch.testing.assert_close(run(torch.tensor([0.5, 0.5])), whole / 2)
    assert run(torch.tensor([1.0, 0.0])) != run(torch.tensor([0.0, 1.0]))
