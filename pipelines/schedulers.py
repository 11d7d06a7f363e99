"""Samplers by the names web-UI users know, each a diffusers scheduler built from the model's own
noise-schedule config (betas, timestep count, prediction type), with the sampler's settings."""

from typing import Any, NamedTuple

import diffusers
from diffusers import SchedulerMixin


class Sampler(NamedTuple):
    class_name: str  # the diffusers scheduler
    settings: dict[str, Any]  # what makes it this sampler
    webui_name: str  # as A1111's "Sampler:" field writes it


SCHEDULERS: dict[str, Sampler] = {
    "ddim": Sampler("DDIMScheduler", {}, "DDIM"),
    "ddpm": Sampler("DDPMScheduler", {}, "DDPM"),
    "pndm": Sampler("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    "lms": Sampler("LMSDiscreteScheduler", {}, "LMS"),
    "heun": Sampler("HeunDiscreteScheduler", {}, "Heun"),
    "euler": Sampler("EulerDiscreteScheduler", {}, "Euler"),
    "euler-ancestral": Sampler("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpm++2m": Sampler(
        "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}, "DPM++ 2M"
    ),
    "dpm++2m-karras": Sampler(
        "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}, "DPM++ 2M Karras"
    ),
    "dpm++sde-karras": Sampler("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}, "DPM++ SDE Karras"),
    "unipc": Sampler("UniPCMultistepScheduler", {}, "UniPC"),
    "lcm": Sampler("LCMScheduler", {}, "LCM"),
}


class UnknownScheduler(ValueError):
    pass


def make_scheduler(name: str, model_scheduler: SchedulerMixin) -> SchedulerMixin:
    """The sampler `name` on the model's noise schedule."""
    if name not in SCHEDULERS:
        raise UnknownScheduler(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    sampler = SCHEDULERS[name]
    return getattr(diffusers, sampler.class_name).from_config(model_scheduler.config, **sampler.settings)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """Our name for a model's own scheduler (its class name when it is none of ours)."""
    class_name = type(scheduler).__name__
    for name, sampler in SCHEDULERS.items():
        settings = sampler.settings.items()
        if sampler.class_name == class_name and all(scheduler.config.get(k) == v for k, v in settings):
            return name
    return class_name
