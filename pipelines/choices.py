"""The names a person picks settings by: the samplers, the emphasis modes, SDXL's size settings.
Plain data, without torch, so that a command line builds its --help and checks its arguments from
them before the libraries load (sample.py --help answers in a fraction of a second)."""

from typing import Any, NamedTuple


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


EMPHASIS_MODES = ("original", "no-norm", "comfy", "none")
WEBUI_EMPHASIS = {"original": "Original", "no-norm": "No norm", "comfy": "comfy", "none": "None"}

HIRES_UPSCALERS = {"latent": "Latent", "lanczos": "Lanczos"}  # ours: A1111's names

SIZE_CONDITIONING = (  # SDXL's settings, each (height, width), by GenerationConfig's names
    "original_size",
    "crop_top_left",
    "target_size",
    "negative_original_size",
    "negative_crop_top_left",
    "negative_target_size",
)

PRECISIONS = ("fp32", "fp16", "bf16")  # what --dtype names besides auto (ldm.model.DTYPES' keys)

CONTROL_PREPROCESSORS = ("none", "canny")  # what sample.py --control-preprocess offers
CANNY_THRESHOLDS = (100, 200)  # sd-webui-controlnet's defaults for its canny module (threshold a, b)
