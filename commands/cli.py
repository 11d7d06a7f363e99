"""What the command lines (sample.py, train.py) share: one-line usage errors, quiet libraries."""

import argparse
import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path

from ldm.errors import UserError


class UsageError(UserError):
    """A mistake in the command line: one line on stderr, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, raising UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> None:
        raise UsageError(message)


def interrupts_while_starting(program: str) -> None:
    """Ctrl-C while the libraries load (seconds): one line and exit 130, not a traceback. Called
    before the heavy imports; main() makes Ctrl-C a KeyboardInterrupt again once started."""

    def interrupted(*_) -> None:
        print(f"{program}: interrupted while starting; nothing written", file=sys.stderr)
        raise SystemExit(130)

    signal.signal(signal.SIGINT, interrupted)


def one_line_warnings(program: str) -> None:
    """Warnings for users as one line, `program: warning: message`, without file and line."""
    warnings.formatwarning = lambda message, *_: f"{program}: warning: {message}\n"


def quiet_libraries() -> None:
    """Our own progress bars and errors only: no loading bars or advice from transformers and diffusers.
    (Imported here, not above: a command's --help and usage errors answer before they load.)"""
    import diffusers
    import transformers

    warnings.simplefilter("ignore", FutureWarning)
    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


PROBE_BYTES = 1 << 20  # what check_writable writes: a full disk (or one nearly full) refuses it


def check_writable(folder: Path, label: str) -> None:
    """Prove a file can be written in the folder (or, while it does not exist, in its nearest existing
    parent) before any long work; nothing is left behind. `label` names the option in the error."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:  # some bytes, flushed to the disk: an empty file is created even on a full disk
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-test-") as file:
            file.write(bytes(PROBE_BYTES))
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        raise UsageError(f"{label}: cannot write there ({error.strerror or type(error).__name__})") from None


def fail(program: str, error: UserError) -> int:
    """A user's mistake, as every command reports it: `program: error: message` on stderr, exit code 2."""
    print(f"{program}: error: {error}", file=sys.stderr)
    return 2


def lora_argument(value: str) -> tuple[str, float]:
    """'style.safetensors:0.7' -> (file, 0.7); a path alone has scale 1."""
    path, colon, scale = value.rpartition(":")
    if not colon or Path(value).is_file():
        return value, 1.0
    try:
        return path, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value}: {scale!r} is not a scale (write FILE or FILE:0.8)") from None
