"""The models, LoRAs and ControlNets a server offers, by name. A name is looked up in a listing of the folder, never
joined onto a path: `../x`, an absolute path or a link that leads out of the folder names nothing."""

from dataclasses import dataclass
from pathlib import Path

from ldm.errors import UserError
from ldm.files import SINGLE_FILE_SUFFIXES


class NotOffered(UserError):
    """A model or LoRA name the server does not offer; one line."""


@dataclass(frozen=True)
class Entry:
    name: str  # A1111's model_name (a file's stem, a folder's name)
    title: str  # A1111's title: the file's name, or the folder's
    path: Path


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, links followed, lies inside `root`."""
    return path.resolve().is_relative_to(root.resolve())


def list_models(default: Path, folder: Path | None) -> list[Entry]:
    """The default model first, then the folder's diffusers folders and single files, by name."""
    entries = [Entry(default.name or str(default), default.name or str(default), default)]
    if folder is None:
        return entries
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not inside(path, folder) or path.resolve() == default.resolve():
            continue
        if path.is_dir() and (path / "model_index.json").is_file():
            entries.append(Entry(path.name, path.name, path))
        elif path.is_file() and path.name.endswith(SINGLE_FILE_SUFFIXES):
            entries.append(Entry(path.stem, path.name, path))
    return entries


def list_loras(folder: Path | None) -> list[Entry]:
    """The folder's LoRA files (.safetensors, in subfolders too, as A1111 looks), by stem."""
    if folder is None or not folder.is_dir():
        return []
    files = sorted(p for p in folder.rglob("*.safetensors") if p.is_file() and inside(p, folder))
    return [Entry(path.stem, path.name, path) for path in files]


def list_controlnets(folder: Path | None) -> list[Entry]:
    """The folder's ControlNets: diffusers folders (config.json) and original files (.safetensors, .pth)."""
    if folder is None or not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.iterdir()):
        if not inside(path, folder):
            continue
        if path.is_dir() and (path / "config.json").is_file():
            entries.append(Entry(path.name, path.name, path))
        elif path.is_file() and path.suffix in (".safetensors", ".pth"):
            entries.append(Entry(path.stem, path.name, path))
    return entries


def find(entries: list[Entry], name: str, kind: str) -> Entry:
    """The entry called `name` (its name or title, as A1111 accepts either)."""
    for entry in entries:
        if name in (entry.name, entry.title):
            return entry
    offered = ", ".join(entry.title for entry in entries) or "none"
    raise NotOffered(f"{kind} {name!r} is not offered here (offered: {offered})")
