"""Opening the images users hand us (init images, masks, control images, PNGs to redraw, uploads,
dataset images), all through one door: the header is read first, and an image that claims more
pixels than we decode is refused in one line before a pixel is decoded (no decompression bomb).

PIL refuses by itself only past twice its MAX_IMAGE_PIXELS (2 x 89,478,485), with a warning below
that; here the limit is MAX_IMAGE_PIXELS itself, or a caller's lower one (the server's uploads)."""

import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from ldm.errors import UserError

Source = Path | str | bytes | BinaryIO  # a file's path, its bytes, or an open binary file


class ImageRefused(UserError):
    """An image that cannot be read, or claims more pixels than are decoded here; one line,
    `NAME: REASON`, where the reason begins "no such file", "unreadable image" or "image too large"."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.reason = reason


@contextmanager
def opened(source: Source, name: str, most: int | None = None) -> Iterator[Image.Image]:
    """`with opened(file, "--mask m.png") as image:` the image with its header read and its size
    checked against `most` pixels (default PIL's MAX_IMAGE_PIXELS); `name` begins the error."""
    most = Image.MAX_IMAGE_PIXELS if most is None else most
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as error:  # past twice PIL's limit: PIL names the count only
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        count = f"{int(claimed.group(1)):,}" if claimed else "too many"
        raise ImageRefused(name, f"image too large ({count} pixels, more than the {most:,} decoded here)") from None
    except FileNotFoundError:
        raise ImageRefused(name, "no such file") from None
    except (OSError, ValueError, SyntaxError) as error:  # PIL's ways of saying "not an image"
        raise ImageRefused(name, unreadable(error)) from None
    with image:
        if most is not None and image.width * image.height > most:
            pixels = f"{image.width}x{image.height} = {image.width * image.height:,} pixels"
            raise ImageRefused(name, f"image too large ({pixels}, more than the {most:,} decoded here)")
        yield image


def read_image(source: Source, name: str, most: int | None = None) -> Image.Image:
    """The image, checked as `opened` checks it, then decoded whole (a truncated file is refused)."""
    with opened(source, name, most) as image:
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as error:  # a truncated or damaged file
            raise ImageRefused(name, unreadable(error)) from None
        return image


def unreadable(error: Exception) -> str:
    """PIL's error as a reason: its type and the first line of its message (not the message that
    repeats the file's name)."""
    if isinstance(error, UnidentifiedImageError):
        return "unreadable image (UnidentifiedImageError: not a format PIL reads)"
    return f"unreadable image ({type(error).__name__}: {(str(error) or '?').splitlines()[0]})"
