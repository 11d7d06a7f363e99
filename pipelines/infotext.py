"""The `parameters` text AUTOMATIC1111 writes into a PNG, and reads back:

    a red circle
    Negative prompt: blurry
    Steps: 25, Sampler: DDIM, CFG scale: 2.5, Seed: 7, Size: 64x64, Model hash: 3f1e2d4c5b, Model: default

Written and read as A1111's modules/infotext_utils.py does (commit 03650022): a value holding a comma,
colon or newline is quoted as a JSON string; the last line holds the `key: value` pairs.
"""

import json
import re
from pathlib import Path
from typing import Any

from ldm.errors import UserError
from ldm.images import ImageRefused, opened
from pipelines.choices import CANNY_THRESHOLDS, PRECISIONS
from pipelines.settings import GenerationConfig, declared, from_text


class InfotextError(UserError):
    """A PNG whose settings cannot be read back; one line."""


_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value: object) -> str:
    """A value as A1111 writes it: JSON-quoted when a comma, colon or newline would break the line."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def format_infotext(prompt: str, negative_prompt: str, pairs: dict[str, object]) -> str:
    """Prompt, negative prompt (no line when empty, as A1111's create_infotext), and the pairs (None
    values left out) on the last line."""
    line = ", ".join(f"{key}: {quote(value)}" for key, value in pairs.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def parse_infotext(text: str) -> dict[str, str]:
    """{"Prompt": ..., "Negative prompt": ..., "Steps": "25", ...}: the pairs as strings, unquoted."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:  # as A1111: a last line with fewer than 3 pairs is prompt text
        lines, last = [*lines, last], ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    return fields | {key: unquote(value) for key, value in _PAIR.findall(last)}


def settings_from_png(path: Path) -> dict[str, Any]:
    """The generation settings a PNG carries, by sample.py's option names: ours (one text chunk per
    setting, exact), else an A1111 `parameters` infotext (what A1111 records; the model is not a path)."""
    try:
        with opened(path, str(path)) as image:
            chunks = dict(getattr(image, "text", {}))
    except ImageRefused as error:
        raise InfotextError(str(error)) from None
    recorded = {"ti_hashes": parse_infotext(chunks["parameters"]).get("TI hashes")} if "parameters" in chunks else {}
    if "scheduler" in chunks and "seed" in chunks:
        try:
            return _ours(chunks) | recorded
        except (KeyError, ValueError, TypeError) as error:
            raise InfotextError(f"{path}: a malformed setting ({type(error).__name__}: {error})") from None
    if "parameters" in chunks:
        return _webui(parse_infotext(chunks["parameters"])) | recorded
    raise InfotextError(f"{path}: carries no generation settings (no 'parameters' text)")


def _ours(chunks: dict[str, str]) -> dict[str, Any]:
    """Every recorded setting, by its declaration's type; the run's model, LoRAs, refiner and
    ControlNets, by name and hash."""
    settings: dict[str, Any] = {"prompt": chunks["prompt"], "model": chunks.get("model"),
                                "model_hash": chunks.get("model_hash"), "dtype": chunks.get("dtype")}  # fmt: skip
    for item, declaration in declared():
        if declaration.png and item.name in chunks:
            settings[item.name] = from_text(item, chunks[item.name])
    loras = [line.rpartition(":") for line in chunks.get("lora", "").splitlines() if line]
    settings["lora"] = [(name, float(scale)) for name, _, scale in loras]
    hashes = [line.rpartition(":") for line in chunks.get("lora_hashes", "").splitlines() if line]
    settings["lora_hashes"] = {name: digest for name, _, digest in hashes}
    settings["controlnet"] = [_our_unit(unit) for unit in json.loads(chunks.get("controlnet", "[]"))]
    if settings["dtype"] not in (None, *PRECISIONS):
        raise ValueError(f"dtype {settings['dtype']!r} is none of {', '.join(PRECISIONS)}")
    return settings | {key: chunks[key] for key in ("refiner", "refiner_hash") if key in chunks}


def _our_unit(unit: Any) -> dict[str, Any]:
    """A ControlNet unit as we record it: its name and hash (its folder, before 2026-12-06), scale,
    start, end and preprocessing; KeyError or ValueError when it is not one."""
    if not isinstance(unit, dict) or not isinstance(unit.get("name") or unit.get("path"), str):
        raise ValueError(f"a ControlNet unit names no ControlNet ({unit!r:.60})")
    numbers = {key: float(unit[key]) for key in ("scale", "start", "end")}
    return unit | numbers | {"preprocess": str(unit["preprocess"])}


def infotext_pairs(config: GenerationConfig) -> dict[str, Any]:
    """A resolved config's settings under A1111's infotext keys, in A1111's names for their values."""
    pairs = {}
    for item, declaration in declared():
        value = getattr(config, item.name)
        if declaration.infotext is None or value is None:
            continue
        if declaration.infotext == "Size":  # A1111's one composite: width x height
            value = f"{config.width}x{config.height}"
        pairs[declaration.infotext] = (declaration.webui or {}).get(value, value)
    return pairs


def _webui(fields: dict[str, str]) -> dict[str, Any]:
    """The settings an A1111 infotext names, by our names and values."""
    if fields.get("Schedule type") == "Karras" and not fields.get("Sampler", "Karras").endswith("Karras"):
        fields["Sampler"] += " Karras"  # A1111 1.9+ writes the schedule apart from the sampler
    settings: dict[str, Any] = {"prompt": fields["Prompt"], "negative_prompt": fields["Negative prompt"],
                                "model": fields.get("Model"), "model_hash": fields.get("Model hash")}  # fmt: skip
    width, _, height = fields.get("Size", "").partition("x")
    try:
        for item, declaration in declared():
            key = declaration.infotext
            if key is None or key not in fields:
                continue
            if key == "Size":
                settings[item.name] = int(height if item.name == "height" else width)
            elif declaration.webui:
                settings[item.name] = _ours_named(declaration.webui, key, fields[key], item.name)
            else:
                settings[item.name] = from_text(item, fields[key])
    except ValueError as error:
        raise InfotextError(f"A1111 parameters: {error}") from None
    # One key, two settings: "Denoising strength" is the hires pass's when there is one (A1111's
    # txt2img writes it only then), else the init image's.
    settings.pop("strength" if "Hires upscale" in fields else "hires_denoise", None)
    units = [read_infotext_unit(fields[f"ControlNet {k}"]) for k in range(len(fields)) if f"ControlNet {k}" in fields]
    try:
        settings["controlnet"] = [
            {"path": None, "model": unit.get("Model"), "scale": float(unit.get("Weight", 1)),
             "start": float(unit.get("Guidance Start", 0)), "end": float(unit.get("Guidance End", 1)),
             "preprocess": unit.get("Module", "none")}
            for unit in units
        ]  # fmt: skip
    except ValueError as error:
        raise InfotextError(f"A1111 parameters: a ControlNet unit: {error}") from None
    return settings


def _ours_named(names: dict[str, str], key: str, text: str, name: str) -> str:
    ours = {webui: our for our, webui in names.items()}
    if text not in ours:
        flag = name.replace("_", "-")
        raise InfotextError(f"{key.lower()} {text!r} has no match here ({', '.join(ours)}); pass --{flag}")
    return ours[text]


def infotext_unit(module: str, model: str, scale: float, start: float, end: float) -> str:
    """A ControlNet unit as sd-webui-controlnet writes it into A1111's infotext (scripts/infotext.py
    at 1e6f6890, `serialize_unit`, under "ControlNet 0", "ControlNet 1" ...), with the fields that
    apply here: the image is resized to the output size, as diffusers does, never cropped."""
    fields = {"Module": module, "Model": model, "Weight": scale, "Resize Mode": "Just Resize"}
    if module == "canny":
        fields |= {"Threshold A": float(CANNY_THRESHOLDS[0]), "Threshold B": float(CANNY_THRESHOLDS[1])}
    fields |= {"Guidance Start": start, "Guidance End": end, "Pixel Perfect": True, "Control Mode": "Balanced"}
    return ", ".join(f"{key}: {value}" for key, value in fields.items())


def read_infotext_unit(text: str) -> dict[str, str]:
    """'Module: canny, Model: x [ab12], Weight: 1.0, ...' -> {"Module": "canny", ...} (its parse_unit's split)."""
    return dict(item.strip().split(": ", 1) for item in text.split(",") if ": " in item)
