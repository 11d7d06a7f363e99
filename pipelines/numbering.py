"""The numbers of an outputs folder: `00007-1234.png` is image 7, `00009-grid.png` a grid.

Runs started together into one folder must not take the same number. A run reserves its numbers
before it draws, each by creating `.NNNNN.reserved` (holding the reserving process's host and pid)
with an exclusive create, which exactly one process can win; the next free number counts
reservations as well as files. A reservation goes once its file is written, or when the run stops
without it; one left by a process of this host that no longer runs (a killed run) is removed by
the next run that reserves (another host's processes cannot be seen from here: theirs stay).
"""

import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path

from ldm.files import OutputExists, running

_NUMBERED = re.compile(r"^(\d{5})-")  # an image, its overlays, a grid
_RESERVED = re.compile(r"^\.(\d{5})\.reserved$")


def number_of(name: str) -> int | None:
    """The number a file name carries, if any."""
    match = _NUMBERED.match(name)
    return int(match.group(1)) if match else None


def next_number(outdir: Path) -> int:
    """One past the highest number in the folder, files and reservations (0 for a new folder)."""
    if not outdir.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := _NUMBERED.match(p.name) or _RESERVED.match(p.name))]
    return max(numbers, default=-1) + 1


def reservation(outdir: Path, number: int) -> Path:
    return outdir / f".{number:05d}.reserved"


def take(outdir: Path, number: int) -> bool:
    """Reserve `number` if no file has it and no other process reserved it first."""
    if any(outdir.glob(f"{number:05d}-*")):
        return False
    try:
        descriptor = os.open(reservation(outdir, number), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    try:
        os.write(descriptor, f"{socket.gethostname()}:{os.getpid()}".encode())
    finally:
        os.close(descriptor)
    return True


def reserve(outdir: Path, count: int) -> int:
    """The first of `count` consecutive numbers, all reserved for this run: the folder's next free
    ones, or past them when another run reserves the same numbers at the same moment."""
    outdir.mkdir(parents=True, exist_ok=True)
    remove_stale_reservations(outdir)
    for _ in range(100):
        first = next_number(outdir)
        taken = []
        for number in range(first, first + count):
            if not take(outdir, number):
                break
            taken.append(number)
        if len(taken) == count:
            return first
        release(outdir, taken)  # another run took a number in the middle: start again past it
    raise OutputExists(f"{outdir}: no {count} free consecutive image numbers after 100 tries")


def release(outdir: Path, numbers: Iterable[int]) -> None:
    for number in numbers:
        reservation(outdir, number).unlink(missing_ok=True)


def remove_stale_reservations(outdir: Path) -> None:
    """Reservations whose process (of this host) no longer runs: their numbers are free again."""
    for path in outdir.iterdir():
        if _RESERVED.match(path.name):
            try:
                host, _, pid = path.read_text().rpartition(":")
            except OSError:
                continue  # removed this moment
            if host == socket.gethostname() and pid.isdigit() and not running(int(pid)):
                path.unlink(missing_ok=True)  # an empty one is being written this moment: kept
