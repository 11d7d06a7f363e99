"""Writing outputs so that none is ever half-written, replaced, or left behind by a dead process.

Each output (a PNG, a .safetensors file, a model folder) is written under a hidden partial name
that carries the writer's pid, `.NAME.partial-PID`, beside its final name, then put in place by a
call that fails if the name already exists: a hard link for a file, a rename for a folder (a
non-empty folder is never renamed over). Two writers of one name: the first to finish wins, the
other gets OutputExists and removes its partial. A partial whose pid no longer runs (a killed
process) is removed the next time anything is written in that folder. A full disk is one line.
"""

import errno
import functools
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ldm.errors import UserError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")  # a single-file checkpoint's name, not a folder or hub id
_PARTIAL = re.compile(r"^\..+\.partial-(\d+)$")
_FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputExists(UserError):
    """An output's name is taken (by an earlier run, or another writer that finished first)."""


class DiskFull(UserError):
    """No space left where an output was being written; the partial output is removed."""


@contextmanager
def writing(path: Path, replace: bool = False) -> Iterator[Path]:
    """`with writing(path) as partial:` write a file or a folder at `partial`; on leaving, it takes
    the name `path` (OutputExists if that exists; `replace=True`: a file of a run's own, such as its
    config.yaml or a validation grid, replaces the old one whole), or is removed if the write failed."""
    path = Path(path)
    remove_stale_partials(path.parent)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield partial
        for written in [partial, *(partial.rglob("*") if partial.is_dir() else [])]:  # safetensors makes 0600
            written.chmod((0o777 if written.is_dir() else 0o666) & ~_umask())
        if replace:
            partial.replace(path)
        else:
            _publish(partial, path)
    except Exception as error:
        if is_disk_full(error):
            raise DiskFull(f"{path}: no space left on the device; nothing was written there") from None
        raise
    finally:
        _remove(partial)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC as Python raises it, and as safetensors ("os error 28") and torch.save ("file write
    failed") report it in their own exception types."""
    if isinstance(error, OSError) and error.errno in _FULL:
        return True
    text = str(error)
    return "os error 28" in text or "No space left on device" in text or "file write failed" in text


def _publish(partial: Path, path: Path) -> None:
    if partial.is_dir():
        try:
            partial.rename(path)  # refused onto a non-empty folder
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OutputExists(f"{path} already exists; choose a new name") from None
            raise
    else:
        try:
            os.link(partial, path)
        except FileExistsError:
            raise OutputExists(f"{path} already exists; choose a new name") from None


def remove_stale_partials(folder: Path) -> None:
    """Remove `.NAME.partial-PID` entries of processes that no longer run."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        match = _PARTIAL.match(entry.name)
        if match and not running(int(match.group(1))):
            _remove(entry)


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: Path) -> str:
    """The file's SHA-256 (hex digits), read once per version of the file in a process: a model's
    weights are hashed when --from-png looks for them, again when the PNG records them, and the
    server names the same files in every request."""
    stat = path.stat()
    return _sha256(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _sha256(path: Path, mtime_ns: int, size: int) -> str:
    """Cached by path, modification time and size: a file replaced in place is hashed anew."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
