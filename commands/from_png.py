"""sample.py --from-png: a PNG's settings (ours, or A1111's `parameters`) as the command line's, for
every flag the user left out, and the files it names (model, refiner, LoRAs, ControlNets, by name
and hash) found on this machine. Runs before the libraries load: plain files only."""

import argparse
import warnings
from pathlib import Path

from commands.cli import UsageError
from pipelines.choices import CONTROL_PREPROCESSORS
from pipelines.infotext import InfotextError, settings_from_png
from pipelines.model_files import find_model
from pipelines.settings import declared

FROM_PNG = (  # the settings a PNG fills in by name
    "prompt",
    *(item.name for item, setting in declared() if setting.png),
)


def apply_png_settings(args: argparse.Namespace, folders: list[Path]) -> None:
    """Fill every setting the command line left out from the PNG's metadata; the files it names
    are looked for in `folders`."""
    try:
        settings = settings_from_png(args.from_png)
    except InfotextError as error:
        raise UsageError(f"--from-png {error}") from None
    for name in FROM_PNG:
        if getattr(args, name) is None and settings.get(name) is not None:
            setattr(args, name, settings[name])
    if args.model is None and (settings.get("model") or settings.get("model_hash")):
        args.model = png_file(args, folders, "model", settings.get("model"), settings.get("model_hash"), "--model PATH")
    if args.refiner is None and settings.get("refiner"):
        args.refiner = png_file(
            args, folders, "refiner", settings["refiner"], settings.get("refiner_hash"), "--refiner PATH"
        )
    if args.lora is None and settings.get("lora"):
        hashes = settings.get("lora_hashes") or {}
        args.lora = [(png_file(args, folders, "LoRA", name, hashes.get(name), "--lora FILE"), scale)
                     for name, scale in settings["lora"]]  # fmt: skip
    if args.dtype is None and settings.get("dtype"):
        args.dtype, args.recorded_dtype = settings["dtype"], f"--from-png {args.from_png}"
    args.ti_hashes = settings.get("ti_hashes")
    if args.prompt_file is not None:
        args.prompt = None  # --prompt-file given: it wins over the PNG's prompt
    apply_png_controls(args, folders, settings.get("controlnet") or [])
    if settings.get("strength") is not None and args.init_image is None:
        raise UsageError(f"--from-png {args.from_png}: it was drawn from an init image; pass it with --init-image")


def png_file(args: argparse.Namespace, folders: list[Path], what: str, name: str | None, short_hash: str | None,
             flag: str) -> str:  # fmt: skip
    """A model, refiner, LoRA or ControlNet a PNG was drawn with, found by name and hash in `folders`
    (beside the shipped model, and --models-dir) and their subfolders; one line naming it when it
    is in none."""
    found = find_model(name, short_hash, folders)
    named = f"{name or '?'} [{short_hash}]" if short_hash else name
    if found is None:
        where = " or ".join(str(folder) for folder in folders)
        raise UsageError(f"--from-png {args.from_png}: drawn with the {what} {named}, which is not in {where}; "
                         f"pass {flag} or --models-dir DIR")  # fmt: skip
    if found.other_hash:
        warnings.warn(f"--from-png: {found.source} has the {what}'s name but hash {found.other_hash}, not "
                      f"{short_hash}: the picture may differ", stacklevel=2)  # fmt: skip
    return found.source


def apply_png_controls(args: argparse.Namespace, folders: list[Path], units: list[dict]) -> None:
    """A PNG's ControlNet units: the ControlNets, found by name and hash (ours record both, A1111
    "name [hash]"), their scales, starts, ends and preprocessing, unless flags give them; the
    control images must be given."""
    if not units:
        return
    if args.controlnet is None:
        args.controlnet = [png_controlnet(args, folders, unit) for unit in units]
    for name, key in (("control_scale", "scale"), ("control_start", "start"), ("control_end", "end"),
                      ("control_preprocess", "preprocess")):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, [unit[key] for unit in units])
    if args.control_preprocess and not set(args.control_preprocess) <= set(CONTROL_PREPROCESSORS):
        raise UsageError(f"--from-png: preprocessing {args.control_preprocess}; offered here: {CONTROL_PREPROCESSORS}")
    if args.control_image is None:
        raise UsageError(f"--from-png: drawn with {len(units)} ControlNet(s); pass the control image(s) with "
                         "--control-image")  # fmt: skip


def png_controlnet(args: argparse.Namespace, folders: list[Path], unit: dict) -> str:
    if unit.get("path"):  # a PNG of ours from before names were recorded
        return unit["path"]
    name, short_hash = unit.get("name"), unit.get("hash")
    if name is None:  # A1111's unit: "control_v11p_sd15_canny [d14c016b]"
        name, _, short_hash = str(unit["model"]).partition(" [")
        short_hash = short_hash.rstrip("]") or None
    return png_file(args, folders, "ControlNet", name, short_hash, "--controlnet PATH")
