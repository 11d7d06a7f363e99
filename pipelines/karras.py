"""The Karras-sigma samplers on zero-terminal-SNR models, run as AUTOMATIC1111 and ComfyUI run them.

A zero-terminal-SNR model (Lin et al. 2023; the demo model) is trained up to pure noise, ᾱ_T = 0,
so its largest sigma, √((1 - ᾱ)/ᾱ), is infinite. A1111 (modules/sd_models.py,
`rescale_zero_terminal_snr_abar`, commit 28bd8e14) and ComfyUI (comfy/model_sampling.py,
`rescale_zero_terminal_snr_sigmas`) set the last ᾱ to 4.8973451890853435e-08 instead, a finite
σ_max of about 4,519, and run k-diffusion's samplers on that sigma table: Karras et al. (2022) sigmas
from σ_max down to σ_min (ρ = 7, then 0), the model called at the fractional timestep whose
log-sigma interpolates the table (k-diffusion's `DiscreteSchedule.sigma_to_t`).

diffusers' DPM-Solver schedulers round those timesteps to integers, so on such a table several
steps share timestep 999 and the solver indexes past its own list (IndexError from 25 steps) or
draws the wrong colours; hence these two, written from k-diffusion's `sample_dpmpp_2m` and
`sample_dpmpp_sde` (crowsonkb/k-diffusion, k_diffusion/sampling.py), behind the small part of the
diffusers scheduler interface that the sampling loop uses. The SDE sampler's fresh noise comes
from each image's own generator (k-diffusion draws it from a Brownian tree).
"""

import math
from types import SimpleNamespace

import torch
from diffusers import DDIMScheduler
from torch import Tensor

ZERO_SNR_LAST_ALPHA_BAR = 4.8973451890853435e-08  # A1111's and ComfyUI's stand-in for ᾱ_T = 0
RHO = 7.0  # Karras et al.'s spacing exponent


def zero_snr_alphas_cumprod(config, last: float) -> Tensor:
    """ᾱ per training timestep of a zero-terminal-SNR schedule, its last (0) raised to `last` so that
    every σ is finite: diffusers' Euler and DPM++ schedulers take 2**-24, A1111 and ComfyUI
    ZERO_SNR_LAST_ALPHA_BAR."""
    alphas_cumprod = DDIMScheduler.from_config(config).alphas_cumprod.double()  # DDIM applies the rescale
    alphas_cumprod[-1] = last
    return alphas_cumprod


def zero_snr_sigmas(config) -> Tensor:
    """σ per training timestep of a zero-terminal-SNR schedule, its last ᾱ set as A1111 sets it."""
    alphas_cumprod = zero_snr_alphas_cumprod(config, ZERO_SNR_LAST_ALPHA_BAR)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    high, low = sigma_max ** (1 / RHO), sigma_min ** (1 / RHO)
    return torch.cat([(high + ramp * (low - high)) ** RHO, torch.zeros(1, dtype=torch.float64)])


class KarrasSampler:
    """DPM++ 2M (`sde=False`) or DPM++ SDE (`sde=True`, two model calls a step: at σ_i and at the
    midpoint in log-sigma) on Karras sigmas. Latents live in k-diffusion's space, x = x₀ + σ ε."""

    def __init__(self, config, sde: bool):
        self.config, self.sde = config, sde
        self.table = zero_snr_sigmas(config)  # σ of each training timestep
        self.order = 2 if sde else 1  # model calls per step

    def set_timesteps(self, steps: int, device: torch.device | str | None = None) -> None:
        self.sigmas = karras_sigmas(steps, float(self.table[0]), float(self.table[-1]))
        self.init_noise_sigma = float(self.sigmas[0])
        calls = []  # (σ the model is called at, the step it belongs to, stage 0 or 1)
        for i in range(steps):
            calls.append(float(self.sigmas[i]))
            if self.sde and self.sigmas[i + 1] > 0:
                calls.append(math.sqrt(float(self.sigmas[i] * self.sigmas[i + 1])))  # midpoint of -log σ
        self.call_sigmas = torch.tensor(calls, dtype=torch.float64)
        self.timesteps = self.sigma_to_t(self.call_sigmas).to(device=device, dtype=torch.float32)
        self.set_begin_index(0)

    def set_begin_index(self, index: int) -> None:
        self.call = index
        self.previous_denoised = None  # DPM++ 2M's second-order history
        self.stage = None  # DPM++ SDE's first stage, kept for the second

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The fractional training timestep whose log σ interpolates the table linearly."""
        log_table, log_sigma = self.table.log(), sigma.double().log()
        low = (log_sigma[None, :] >= log_table[:, None]).sum(0).sub(1).clamp(0, len(self.table) - 2)
        weight = (log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1])
        return low + weight.clamp(0, 1)

    def _sigma(self, t: Tensor) -> float:
        return float(self.call_sigmas[int((self.timesteps - t).abs().argmin())])

    def scale_model_input(self, x: Tensor, t: Tensor) -> Tensor:
        return x / math.sqrt(self._sigma(t) ** 2 + 1)

    def add_noise(self, original: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return original + noise * self._sigma(timesteps[0])

    def _denoised(self, prediction: Tensor, x: Tensor, sigma: float) -> Tensor:
        """x₀ from the model's output: ε (x - σ ε) or v (c_skip x + c_out v, k-diffusion's VDenoiser)."""
        if self.config.prediction_type == "v_prediction":
            return x / (sigma**2 + 1) - prediction * sigma / math.sqrt(sigma**2 + 1)
        return x - prediction * sigma

    def step(self, prediction: Tensor, t: Tensor, x: Tensor, generator: list[torch.Generator] | None = None):
        sigma = self._sigma(t)
        denoised = self._denoised(prediction.double(), x.double(), sigma)
        if self.sde:
            out = self._sde_step(denoised, x.double(), sigma, generator)
        else:
            out = self._dpmpp_2m_step(denoised, x.double(), sigma)
        self.call += 1
        return SimpleNamespace(prev_sample=out.to(x.dtype))

    def _next_sigma(self, sigma: float) -> float:
        index = int((self.sigmas - sigma).abs().argmin())
        return float(self.sigmas[index + 1])

    def _dpmpp_2m_step(self, denoised: Tensor, x: Tensor, sigma: float) -> Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022) in k-diffusion's form: in t = -log σ, a first-order
        step, corrected by the previous step's x₀ once there is one (and not into σ = 0)."""
        sigma_next = self._next_sigma(sigma)
        if sigma_next == 0:
            return denoised
        h = math.log(sigma) - math.log(sigma_next)
        if self.previous_denoised is not None:
            previous_sigma = float(self.sigmas[int((self.sigmas - sigma).abs().argmin()) - 1])
            r = (math.log(previous_sigma) - math.log(sigma)) / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * self.previous_denoised
        else:
            estimate = denoised
        self.previous_denoised = denoised
        return (sigma_next / sigma) * x - math.expm1(-h) * estimate

    def _sde_step(self, denoised: Tensor, x: Tensor, sigma: float, generator) -> Tensor:
        """DPM-Solver++ SDE (k-diffusion's `sample_dpmpp_sde`, η = 1, r = 1/2): an ancestral step to
        the log-sigma midpoint, then from σ_i to σ_{i+1} with the two x₀ averaged; Euler into σ = 0."""
        if self.stage is None:
            sigma_next = self._next_sigma(sigma)
            if sigma_next == 0:
                return denoised
            midpoint = math.sqrt(sigma * sigma_next)
            self.stage = (x, denoised, sigma, sigma_next)
            return _ancestral(x, denoised, sigma, midpoint, _noise(x, generator))
        x, first, sigma_start, sigma_next = self.stage
        self.stage = None
        return _ancestral(x, (first + denoised) / 2, sigma_start, sigma_next, _noise(x, generator))


def _ancestral(x: Tensor, denoised: Tensor, sigma: float, sigma_to: float, noise: Tensor) -> Tensor:
    """From σ to σ_to in the exponential-integrator form, as an ancestral step: down to σ_down
    deterministically, then fresh noise of σ_up (σ_down² + σ_up² = σ_to²)."""
    up = min(sigma_to, math.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2))
    down = math.sqrt(sigma_to**2 - up**2)
    h = math.log(sigma) - math.log(down)
    return (down / sigma) * x - math.expm1(-h) * denoised + noise * up


def _noise(x: Tensor, generators: list[torch.Generator] | None) -> Tensor:
    """Fresh noise, image k's from its own generator, so image k is the same in any batch."""
    if not generators:
        return torch.randn_like(x)
    return torch.cat([torch.randn(x.shape[1:], generator=g, dtype=x.dtype)[None] for g in generators]).to(x.device)
