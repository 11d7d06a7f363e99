"""The Karras-sigma samplers on zero-terminal-SNR models, as A1111 (modules/sd_models.py,
rescale_zero_terminal_snr_abar, commit 28bd8e14) and ComfyUI (comfy/model_sampling.py) run them with
k-diffusion's samplers (k_diffusion/sampling.py: get_sigmas_karras, sample_dpmpp_2m, sample_dpmpp_sde)."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from pipelines.karras import ZERO_SNR_LAST_ALPHA_BAR, KarrasSampler, karras_sigmas, zero_snr_sigmas
from pipelines.samplers import make_scheduler

ZERO_SNR = DDIMScheduler(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
    rescale_betas_zero_snr=True, timestep_spacing="trailing",
)  # fmt: skip


def test_the_last_alpha_bar_is_a1111s_so_the_largest_sigma_is_finite():
    sigmas = zero_snr_sigmas(ZERO_SNR.config)
    assert float(sigmas[-1]) == pytest.approx(math.sqrt((1 - ZERO_SNR_LAST_ALPHA_BAR) / ZERO_SNR_LAST_ALPHA_BAR))
    assert float(sigmas[-1]) == pytest.approx(4518.76, abs=0.01)
    assert torch.isfinite(sigmas).all() and (sigmas[1:] > sigmas[:-1]).all()


def test_karras_sigmas_follow_the_papers_formula():
    sigmas = karras_sigmas(4, 0.03, 4500.0)
    expected = [(4500 ** (1 / 7) + i / 3 * (0.03 ** (1 / 7) - 4500 ** (1 / 7))) ** 7 for i in range(4)] + [0.0]
    assert sigmas.tolist() == pytest.approx(expected)


def test_timesteps_are_fractional_log_sigma_interpolations():
    sampler = KarrasSampler(ZERO_SNR.config, sde=False)
    table = sampler.table
    assert sampler.sigma_to_t(table[[0, 500, 999]]).tolist() == pytest.approx([0, 500, 999])
    between = (table[10].log() * 0.25 + table[11].log() * 0.75).exp()
    assert float(sampler.sigma_to_t(between[None])) == pytest.approx(10.75)


@pytest.mark.parametrize("name, calls", [("dpm++2m-karras", 30), ("dpm++sde-karras", 59)])
def test_zero_snr_models_get_k_diffusions_samplers_and_other_models_diffusers(name, calls):
    sampler = make_scheduler(name, ZERO_SNR)
    assert isinstance(sampler, KarrasSampler)
    sampler.set_timesteps(30)
    assert len(sampler.timesteps) == calls  # the SDE: two calls a step, one into sigma 0
    assert sampler.init_noise_sigma == pytest.approx(4518.76, abs=0.01)
    ordinary = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert not isinstance(make_scheduler(name, ordinary), KarrasSampler)


def test_an_exact_denoiser_is_followed_to_its_data_by_both_samplers():
    """A model that always predicts the true x0 (zeros, for data that is all zeros) is followed to
    it exactly: the last step, into sigma 0, lands on x0."""
    for sde in (False, True):
        sampler = KarrasSampler(ZERO_SNR.config, sde=sde)
        sampler.set_timesteps(10)
        x = torch.randn(1, 4, 8, 8, dtype=torch.float64) * sampler.init_noise_sigma
        for t in sampler.timesteps:
            sigma = sampler._sigma(t)
            v = x / (sigma * math.sqrt(sigma**2 + 1))  # x0 = x/(σ²+1) - v σ/√(σ²+1) = 0
            x = sampler.step(v, t, x).prev_sample
        assert x.abs().max() < 1e-6, sde
