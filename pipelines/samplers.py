"""Samplers by the names web-UI users know, each a diffusers scheduler built from the model's own
noise-schedule config (betas, timestep count, prediction type), with the sampler's settings.

Zero-terminal-SNR models (`rescale_betas_zero_snr`, as the demo model; Lin et al. 2023, "Common
Diffusion Noise Schedules and Sample Steps are Flawed"): the schedulers that know the option rescale
the betas themselves; the others (PNDM, LMS, Heun, DPM++ SDE) get the rescaled betas as
`trained_betas`, with the last step's signal at 2**-24 instead of 0, as diffusers' Euler keeps its
first sigma finite. Heun starts one step lower there ("leading" timesteps, from t=901 at 10 steps):
its second-order correction across the first step, from sigma 4,096 to 18, multiplies the model's
error about a hundredfold (grey, exploded pictures at 10 steps). The two Karras-sigma samplers run
there as A1111 and ComfyUI run them, on k-diffusion's algorithms (pipelines/karras.py): diffusers'
solvers round the timesteps and fail on that sigma table.
"""

import inspect
import warnings

import diffusers
import torch
from diffusers import SchedulerMixin

from ldm.errors import UserError
from pipelines.choices import SCHEDULERS, Sampler
from pipelines.karras import KarrasSampler, zero_snr_alphas_cumprod


class UnknownScheduler(UserError):
    """A scheduler name we do not know, or one that cannot work on this model; one line."""


def check_scheduler(name: str, model_scheduler: SchedulerMixin) -> None:
    """Refuse a sampler this model cannot use; warn about one it was not made for. Once per run."""
    _sampler(name)
    if name == "lcm" and type(model_scheduler).__name__ != "LCMScheduler":
        warnings.warn(
            "lcm is for LCM-distilled models (or an LCM-LoRA) at 2-8 steps and guidance 1-2; "
            f"this model's own scheduler is {type(model_scheduler).__name__}",
            stacklevel=3,
        )


def make_scheduler(name: str, model_scheduler: SchedulerMixin) -> SchedulerMixin | KarrasSampler:
    """The sampler `name` on the model's noise schedule (a fresh one: samplers keep state)."""
    sampler, config = _sampler(name), model_scheduler.config
    settings = dict(sampler.settings)
    if config.get("rescale_betas_zero_snr") and settings.get("use_karras_sigmas"):
        return KarrasSampler(config, sde=name == "dpm++sde-karras")
    scheduler_class = getattr(diffusers, sampler.class_name)
    if config.get("rescale_betas_zero_snr"):
        if "rescale_betas_zero_snr" not in inspect.signature(scheduler_class.__init__).parameters:
            settings["trained_betas"] = zero_terminal_snr_betas(config)
        if name == "heun":
            settings["timestep_spacing"] = "leading"
    return scheduler_class.from_config(config, **settings)


def _sampler(name: str) -> Sampler:
    if name not in SCHEDULERS:
        raise UnknownScheduler(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def zero_terminal_snr_betas(config) -> list[float]:
    """The betas a zero-terminal-SNR model was trained with, its last signal level raised from 0 to
    2**-24 so that every sigma is finite (as diffusers' Euler and DPM++ schedulers do)."""
    alphas_cumprod = zero_snr_alphas_cumprod(config, 2**-24)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return (1 - alphas_cumprod / previous).tolist()


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """Our name for a model's own scheduler (its class name when it is none of ours)."""
    class_name = type(scheduler).__name__
    for name, sampler in SCHEDULERS.items():
        settings = sampler.settings.items()
        if sampler.class_name == class_name and all(scheduler.config.get(k) == v for k, v in settings):
            return name
    return class_name
