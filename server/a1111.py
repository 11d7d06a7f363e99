"""AUTOMATIC1111's HTTP API, translated to ours: its request fields to a GenerationConfig, its sampler
and schedule names to our samplers, its response shapes. Matched against A1111's modules/api/api.py
(commit 0050a354: routes, `text2imgapi`, `progressapi`, `pnginfoapi`) and modules/api/models.py
(commit 008a8e75: the request and response models), and driven in the tests by the `webuiapi` client.

The request fields are GenerationConfig's declared `api` names plus A1111's own. A field we do not
implement is accepted at the value that leaves the picture as A1111 draws it by default (clients
send the whole payload), and refused with a 422 naming it otherwise."""

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, create_model

from ldm.errors import UserError
from ldm.images import ImageRefused, read_image
from pipelines.choices import CANNY_THRESHOLDS, CONTROL_PREPROCESSORS, HIRES_UPSCALERS, SCHEDULERS, WEBUI_EMPHASIS
from pipelines.extra_networks import lora_tags
from pipelines.settings import GenerationConfig, declared, value_type
from server.limits import Limits

# A1111 1.9+ names a sampler and its schedule apart; "automatic" is each sampler's default schedule:
# Karras for these two (modules/sd_samplers_kdiffusion.py, samplers_k_diffusion), uniform for the rest.
KARRAS_BY_DEFAULT = ("DPM++ 2M", "DPM++ SDE")
SCHEDULES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}

# A1111's fields we do not implement, with the values at which A1111 draws what we draw.
NEUTRAL: dict[str, tuple] = {
    "restore_faces": (False,),
    "tiling": (False,),
    "styles": ([],),
    "subseed_strength": (0,),
    "seed_resize_from_h": (0, -1),
    "seed_resize_from_w": (0, -1),
    "s_churn": (0,),
    "s_noise": (1,),
    "s_tmin": (0,),
    "refiner_checkpoint": ("", "None"),
    "disable_extra_networks": (False,),
    "infotext": ("",),
    "script_name": ("",),
    "firstpass_image": ("",),
    "resize_mode": (0,),  # "just resize", as we resize an init image to the output size
    "inpainting_mask_invert": (0,),
    "initial_noise_multiplier": (1,),
}
# Read by A1111 only with a mask: no blur, start from the original, repaint at the image's resolution.
MASKED = {"mask_blur": (0,), "inpainting_fill": (1,), "inpaint_full_res": (False, 0)}
NEUTRAL_OPTIONS = {"CLIP_stop_at_last_layers": (1,), "sd_vae": ("Automatic", "None")}
HIRES = ("enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
         "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt")  # fmt: skip
IGNORED = (  # A1111 fields that change nothing here (saving is always on), or that are read apart (HIRES)
    "prompt", "sampler_name", "sampler_index", "scheduler", "n_iter", "override_settings",
    "override_settings_restore_afterwards", "send_images", "save_images", "do_not_save_samples", "do_not_save_grid",
    "alwayson_scripts", "script_args", "s_tmax", "eta", "subseed", "comments", "force_task_id", "image_cfg_scale",
    "include_init_images", "firstphase_width", "firstphase_height", "hr_additional_modules", "refiner_switch_at",
    "init_images", "mask", *HIRES,
)  # fmt: skip


class Unsupported(UserError):
    """A request field at a value we cannot draw as A1111 would (422, naming the field)."""


def request_model(name: str, img2img: bool) -> type[BaseModel]:
    """The txt2img or img2img request: GenerationConfig's declared API fields, A1111's own, and
    every field of NEUTRAL, each optional; unknown fields are ignored, as A1111 does."""
    ours = {s.api: (value_type(item) | None, None) for item, s in declared() if s.api}
    theirs: dict[str, Any] = {
        "prompt": (str, ""),
        "sampler_name": (str | None, None),
        "sampler_index": (str | None, None),
        "scheduler": (str | None, None),
        "n_iter": (int, 1),
        "override_settings": (dict[str, Any] | None, None),
        "send_images": (bool, True),
        "alwayson_scripts": (dict[str, Any] | None, None),
        "eta": (float | None, None),
    }
    unchecked = {field: (Any, None) for field in (*NEUTRAL, *MASKED, *IGNORED) if field not in ours | theirs}
    if img2img:
        theirs |= {"init_images": (list[str] | None, None), "mask": (str | None, None)}
    config = ConfigDict(extra="ignore", protected_namespaces=())
    return create_model(name, __config__=config, **(unchecked | ours | theirs))


Txt2ImgRequest = request_model("Txt2ImgRequest", img2img=False)
Img2ImgRequest = request_model("Img2ImgRequest", img2img=True)


@dataclass(frozen=True)
class Translated:
    """A request in our terms; the model and LoRAs still by name."""

    prompt: str
    config: GenerationConfig
    checkpoint: str | None  # override_settings.sd_model_checkpoint
    loras: list[tuple[str, float]]
    init_image: Image.Image | None
    mask: Image.Image | None
    controls: tuple["ControlRequest", ...] = ()  # alwayson_scripts.controlnet's units


@dataclass(frozen=True)
class ControlRequest:
    """One of sd-webui-controlnet's units, its model still by name."""

    model: str
    image: Image.Image
    weight: float
    start: float
    end: float
    module: str  # none or canny


def translate(request: BaseModel, limits: Limits) -> Translated:
    """The request as our settings, every field checked, the server's limits first; then the images
    decoded (at most `limits.upload_pixels` each)."""
    fields = request.model_dump()
    init_images, mask = fields.get("init_images"), fields.get("mask")
    _check_neutral(fields, masked=bool(mask))
    options = dict(fields["override_settings"] or {})
    checkpoint = options.pop("sd_model_checkpoint", None)
    emphasis = _emphasis(options.pop("emphasis", None))
    for name, value in options.items():
        if value not in NEUTRAL_OPTIONS.get(name, ()):
            raise Unsupported(f"override_settings.{name}={value!r}: not supported here")
    scripts = dict(fields["alwayson_scripts"] or {})
    units = scripts.pop("controlnet", None) or scripts.pop("ControlNet", None) or {}
    _check_scripts(scripts)
    prompt, loras = lora_tags(fields["prompt"])
    negative, negative_loras = lora_tags(fields.get("negative_prompt") or "")
    given = {item.name: fields.get(s.api) for item, s in declared() if s.api and fields.get(s.api) is not None}
    if init_images is None:  # txt2img: A1111 reads denoising_strength for the hires pass only
        given.pop("strength", None)
    batch = fields.get("batch_size") or 1
    config = GenerationConfig(**given | _hires(fields, img2img=init_images is not None) | {
        "negative_prompt": negative,
        "num_images": batch * fields["n_iter"],
        "scheduler": sampler(fields["sampler_name"] or fields["sampler_index"], fields["scheduler"]),
        "emphasis": emphasis,
    })  # fmt: skip
    _check_eta(fields["eta"], config.scheduler)
    limits.check(config, units=len(enabled_units(units)))
    max_pixels = limits.upload_pixels
    init = None
    if init_images is not None:
        if len(init_images) != 1:
            raise Unsupported(f"init_images: give one image ({len(init_images)} given)")
        init = decode_image(init_images[0], "init_images[0]", max_pixels)
    return Translated(prompt, config, checkpoint, loras + negative_loras, init,
                      None if not mask else decode_image(mask, "mask", max_pixels),
                      tuple(controls(units, config, max_pixels)))  # fmt: skip


def controls(script: dict[str, Any], config: GenerationConfig, max_pixels: int) -> list[ControlRequest]:
    """`alwayson_scripts.controlnet.args`: sd-webui-controlnet's units (internal_controlnet/
    external_code.py at 1e6f6890: module, model, weight, image, guidance_start/end, resize_mode,
    control_mode ...). A disabled unit is skipped; a field at a value drawn otherwise here is refused."""
    found = []
    for k, unit in enabled_units(script):
        where = f"alwayson_scripts.controlnet.args[{k}]"
        if not isinstance(unit, dict) or not unit.get("model") or unit.get("model") == "None":
            raise Unsupported(f"{where}: a unit is an object naming its model")
        module = str(unit.get("module", "none")).lower()
        if module not in CONTROL_PREPROCESSORS:
            raise Unsupported(f"{where}.module={unit['module']!r}: use one of {', '.join(CONTROL_PREPROCESSORS)}")
        for name, neutral in (("control_mode", ("Balanced", 0)), ("guess_mode", (False,))):
            if unit.get(name) is not None and unit[name] not in neutral:
                raise Unsupported(f"{where}.{name}={unit[name]!r}: only {neutral[0]!r} here")
        if module == "canny":
            for name, default in zip(("threshold_a", "threshold_b"), CANNY_THRESHOLDS, strict=True):
                if unit.get(name) not in (None, -1, default):
                    raise Unsupported(f"{where}.{name}={unit[name]!r}: canny runs at {default} here")
        data = unit.get("image") or unit.get("input_image")
        if isinstance(data, dict):  # {"image": ..., "mask": ...}, as the web UI sends it
            if data.get("mask"):
                raise Unsupported(f"{where}.image.mask: an image mask is not supported here")
            data = data.get("image")
        if not isinstance(data, str):
            raise Unsupported(f"{where}.image: give the control image (base64)")
        image = decode_image(data, f"{where}.image", max_pixels)
        _check_resize(unit.get("resize_mode"), image, config, where)
        found.append(ControlRequest(str(unit["model"]), image, float(unit.get("weight", 1.0)),
                                    float(unit.get("guidance_start", 0.0)), float(unit.get("guidance_end", 1.0)),
                                    module))  # fmt: skip
    return found


def enabled_units(script: Any) -> list[tuple[int, Any]]:
    """`alwayson_scripts.controlnet.args`'s units that are not disabled, with their places."""
    units = script.get("args", []) if isinstance(script, dict) else None
    if not isinstance(units, list):
        raise Unsupported("alwayson_scripts.controlnet.args: a list of units")
    return [(k, unit) for k, unit in enumerate(units)
            if unit is not False and not (isinstance(unit, dict) and unit.get("enabled", True) is False)]  # fmt: skip


def _check_resize(mode: Any, image: Image.Image, config: GenerationConfig, where: str) -> None:
    """The control image is resized to the output size ("Just Resize"); other modes crop or pad it,
    which changes nothing when it already has the output's shape."""
    if mode in (None, "Just Resize", 0) or config.width is None or config.height is None:
        return
    if image.width * config.height != image.height * config.width:
        raise Unsupported(f"{where}.resize_mode={mode!r}: only 'Just Resize' for an image of another shape")


def _hires(fields: dict[str, Any], img2img: bool) -> dict[str, Any]:
    """A1111's hires fix (`enable_hr` and the `hr_*` fields) in our settings; {} when it is off."""
    if not fields.get("enable_hr") or img2img:
        return {}
    for name in ("hr_resize_x", "hr_resize_y"):
        if fields.get(name) not in (None, 0):
            raise Unsupported(f"{name}={fields[name]!r}: give hr_scale instead")
    for name in ("hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt"):
        if fields.get(name) not in (None, "") and not str(fields[name]).startswith("Use same"):
            raise Unsupported(f"{name}={fields[name]!r}: the hires pass uses the first pass's here")
    upscalers = {webui: ours for ours, webui in HIRES_UPSCALERS.items()}
    upscaler = fields.get("hr_upscaler") or "Latent"
    if upscaler not in upscalers:
        raise Unsupported(f"hr_upscaler={upscaler!r}: use one of {', '.join(upscalers)}")
    return {
        "hires_scale": fields.get("hr_scale") or 2.0,
        "hires_upscaler": upscalers[upscaler],
        "hires_steps": fields.get("hr_second_pass_steps") or None,
        "hires_denoise": fields.get("denoising_strength"),
    }


def _check_neutral(fields: dict[str, Any], masked: bool) -> None:
    for name, allowed in (NEUTRAL | MASKED if masked else NEUTRAL).items():
        value = fields.get(name)
        if value is not None and value not in allowed:
            raise Unsupported(f"{name}={value!r}: not supported here (only {' or '.join(map(repr, allowed))})")


def _check_scripts(scripts: dict[str, Any]) -> None:
    """Extensions' scripts: accepted when they send nothing or switch themselves off (args [] or
    [False, ...]), as clients do for the extensions they know of."""
    for name, script in scripts.items():
        args = script.get("args", []) if isinstance(script, dict) else None
        if not isinstance(args, list) or args and args[0] is not False:
            raise Unsupported(f"alwayson_scripts.{name}: extensions' scripts are not supported here")


def _check_eta(eta: float | None, scheduler: str | None) -> None:
    """A1111's eta is the ancestral samplers' noise (1 by default) and DDIM's (0); the others ignore it."""
    neutral = {"euler-ancestral": 1.0, "dpm++sde-karras": 1.0, "ddim": 0.0}
    if eta is not None and scheduler is None:
        raise Unsupported(f"eta={eta}: name the sampler it is for (sampler_name)")
    if eta is not None and scheduler in neutral and eta != neutral[scheduler]:
        raise Unsupported(f"eta={eta}: only {neutral[scheduler]} with sampler {SCHEDULERS[scheduler].webui_name}")


def _emphasis(value: str | None) -> str:
    ours = {webui: name for name, webui in WEBUI_EMPHASIS.items()}
    if value is not None and value not in ours:
        raise Unsupported(f"override_settings.emphasis={value!r}: use one of {', '.join(ours)}")
    return "original" if value is None else ours[value]


def sampler(name: str | None, schedule: str | None) -> str | None:
    """Our sampler for A1111's sampler name and schedule ("DPM++ 2M" + "Karras" -> dpm++2m-karras);
    None (the model's own) when no sampler is named."""
    if not name:
        if (schedule or "automatic").lower() != "automatic":
            raise Unsupported(f"scheduler={schedule!r}: name the sampler it is for (sampler_name)")
        return None
    if name.endswith(" Karras"):  # the names before 1.9, which A1111 still reads
        name, schedule = name.removesuffix(" Karras"), "karras"
    schedule = (schedule or "automatic").lower()  # A1111 reads names and labels ("karras", "Karras")
    if schedule == "automatic":
        schedule = "karras" if name in KARRAS_BY_DEFAULT else "uniform"
    webui = f"{name} Karras" if schedule == "karras" else name
    for ours, known in SCHEDULERS.items():
        if known.webui_name == webui and schedule in ("uniform", "karras"):
            return ours
    raise Unsupported(f"sampler_name={name!r} with scheduler={schedule!r}: not here; see /sdapi/v1/samplers")


def samplers() -> list[dict[str, Any]]:
    """/sdapi/v1/samplers: A1111's sampler names we draw with, and our names as aliases."""
    found: dict[str, dict[str, Any]] = {}
    for ours, known in SCHEDULERS.items():
        name = known.webui_name.removesuffix(" Karras")
        entry = found.setdefault(name, {"name": name, "aliases": [], "options": {}})
        entry["aliases"].append(ours)
        if known.webui_name.endswith(" Karras") and name in KARRAS_BY_DEFAULT:
            entry["options"] = {"scheduler": "karras"}
    return list(found.values())


def schedulers() -> list[dict[str, Any]]:
    """/sdapi/v1/schedulers, in A1111's shape."""
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name, label in SCHEDULES.items()]  # fmt: skip


def decode_image(data: str, field: str, max_pixels: int) -> Image.Image:
    """A base64 image (a `data:image/...;base64,` prefix allowed), refused in one line when it is not
    one or has more than `max_pixels` pixels (checked before it is decoded: no decompression bomb)."""
    if data.startswith("data:image/"):
        data = data.partition(",")[2]
    try:
        return read_image(base64.b64decode(data, validate=True), field, max_pixels)
    except binascii.Error:
        raise Unsupported(f"{field}: not a base64-encoded image") from None
    except ImageRefused as error:
        raise Unsupported(str(error)) from None


def encode_png(data: bytes) -> str:
    return base64.b64encode(data).decode()


def info(prompt: str, config: GenerationConfig, seeds: list[int], infotexts: list[str], model: str,
         model_hash: str | None) -> str:  # fmt: skip
    """The `info` string A1111 returns: its Processed.js() JSON, with what we drew."""
    sampler_name = SCHEDULERS[config.scheduler].webui_name
    return json.dumps({
        "prompt": prompt, "all_prompts": [prompt] * len(seeds),
        "negative_prompt": config.negative_prompt, "all_negative_prompts": [config.negative_prompt] * len(seeds),
        "seed": seeds[0] if seeds else config.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
        "width": config.width, "height": config.height, "sampler_name": sampler_name,
        "cfg_scale": config.guidance_scale, "steps": config.steps, "batch_size": config.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model, "sd_model_hash": model_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": config.strength or config.hires_denoise, "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts, "styles": [], "job_timestamp": "", "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": "ldm-toolkit",
    })  # fmt: skip
