"""Models on disk by name and hash: what a PNG records of the files it was drawn with (model,
refiner, LoRAs, ControlNets), and how --from-png finds them again.

A PNG is shared, so it records each file as A1111 does, by name and short hash, never by its path
(which names the user's folders): a local file's or folder's name, or a hub id as it is.
Plain files only: sample.py reads a PNG before the libraries load.
"""

from pathlib import Path
from typing import NamedTuple

from ldm.files import file_sha256

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pth")  # models, LoRAs, ControlNets as single files


def model_name(source: str) -> str:
    """A local model's folder or file name (no path); a hub id as it is."""
    path = Path(source).expanduser()
    return path.name if path.exists() else source


def model_hash(source: str | Path, length: int = 10) -> str | None:
    """A1111's short hash of a local model: the single file's SHA-256, or for a diffusers folder its
    UNet weights file's (a ControlNet folder's own weights'); None for a hub id (no local file named
    by the user). sd-webui-controlnet shows 8 digits, A1111 10."""
    path = Path(source)
    weights = path
    if path.is_dir():
        weights = path / "unet" / "diffusion_pytorch_model.safetensors"
        weights = weights if weights.is_file() else path / "diffusion_pytorch_model.safetensors"
    return file_sha256(weights)[:length] if weights.is_file() else None


def local_files(folders: list[Path], depth: int = 1) -> list[Path]:
    """The weight files and diffusers folders (model_index.json or config.json) in these folders and,
    `depth` levels down, their subfolders (as A1111's models/Stable-diffusion, models/Lora)."""
    found = []
    for folder in folders:
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            weights = path.is_file() and path.suffix in WEIGHT_SUFFIXES
            if weights or (path / "model_index.json").is_file() or (path / "config.json").is_file():
                found.append(path)
            elif path.is_dir() and depth > 0:
                found += local_files([path], depth - 1)
    return found


class Found(NamedTuple):
    source: str  # a path, or a hub id
    other_hash: str | None = None  # the found model's hash, where it differs from the PNG's


def find_model(name: str | None, short_hash: str | None, folders: list[Path]) -> Found | None:
    """The model (refiner, LoRA, ControlNet) a PNG names, among the files in `folders`: by name (a
    folder's or file's name, or a file's stem as A1111 writes it) with the recorded hash, else by
    hash alone (a renamed file), else by name alone (`other_hash` says its hash differs); a hub id
    (owner/name) that is not on disk, as itself; an older PNG's path, where it still exists. None
    when nothing fits."""
    if name and Path(name).is_absolute() and Path(name).exists():
        return Found(name)
    models = local_files(folders)
    named = [path for path in models if name and Path(name).name in (path.name, path.stem)]
    hashes = {path: model_hash(path, len(short_hash)) for path in named} if short_hash else {}
    for path in named:
        if hashes[path] == short_hash:
            return Found(str(path))
    for path in models if short_hash else []:  # renamed: found by its hash alone
        if path not in named and model_hash(path, len(short_hash)) == short_hash:
            return Found(str(path))
    if named:
        return Found(str(named[0]), hashes.get(named[0]))
    if name and "/" in name and not Path(name).is_absolute():
        return Found(name)  # a hub id
    return None
