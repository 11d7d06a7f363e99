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

from PIL import Image

from ldm.errors import UserError
from pipelines.choices import SCHEDULERS, SIZE_CONDITIONING, WEBUI_EMPHASIS


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
        with Image.open(path) as image:
            chunks = dict(getattr(image, "text", {}))
    except OSError:
        raise InfotextError(f"{path}: not a readable image") from None
    if "scheduler" in chunks and "seed" in chunks:
        try:
            return _ours(chunks)
        except (KeyError, ValueError) as error:
            raise InfotextError(f"{path}: a malformed setting ({type(error).__name__}: {error})") from None
    if "parameters" in chunks:
        return _webui(parse_infotext(chunks["parameters"]))
    raise InfotextError(f"{path}: carries no generation settings (no 'parameters' text)")


def _ours(chunks: dict[str, str]) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "prompt": chunks["prompt"],
        "negative_prompt": chunks.get("negative_prompt", ""),
        "seed": int(chunks["seed"]),
        "steps": int(chunks["steps"]),
        "scheduler": chunks["scheduler"],
        "guidance_scale": float(chunks["guidance_scale"]),
        "emphasis": chunks.get("emphasis", "original"),
        "model": chunks.get("model"),
        "height": int(chunks["height"]),
        "width": int(chunks["width"]),
        "strength": float(chunks["strength"]) if "strength" in chunks else None,
    }
    sdxl = {name: [int(v) for v in chunks[name].split(",")] for name in SIZE_CONDITIONING if name in chunks}
    sdxl |= {name: chunks[name] for name in ("prompt_2", "negative_prompt_2", "refiner") if name in chunks}
    sdxl |= {"refiner_switch": float(chunks["refiner_switch"])} if "refiner_switch" in chunks else {}
    loras = [line.rpartition(":") for line in chunks.get("lora", "").splitlines() if line]
    return settings | sdxl | {"lora": [(path, float(scale)) for path, _, scale in loras]}


def _webui(fields: dict[str, str]) -> dict[str, Any]:
    sampler = fields.get("Sampler", "")
    if fields.get("Schedule type") == "Karras" and not sampler.endswith("Karras"):
        sampler += " Karras"  # A1111 1.9+ writes the schedule apart from the sampler
    names = {s.webui_name: name for name, s in SCHEDULERS.items()}
    if sampler and sampler not in names:
        raise InfotextError(f"sampler {sampler!r} has no match here ({', '.join(names)}); pass --scheduler")
    emphasis = {webui: ours for ours, webui in WEBUI_EMPHASIS.items()}.get(fields.get("Emphasis", "Original"))
    width, _, height = fields.get("Size", "").partition("x")
    try:
        return {
            "prompt": fields["Prompt"],
            "negative_prompt": fields["Negative prompt"],
            "seed": int(fields["Seed"]) if "Seed" in fields else None,
            "steps": int(fields["Steps"]) if "Steps" in fields else None,
            "scheduler": names.get(sampler),
            "guidance_scale": float(fields["CFG scale"]) if "CFG scale" in fields else None,
            "emphasis": emphasis,
            "height": int(height) if height else None,
            "width": int(width) if width else None,
            "strength": float(fields["Denoising strength"]) if "Denoising strength" in fields else None,
        }
    except ValueError as error:
        raise InfotextError(f"A1111 parameters: {error}") from None
