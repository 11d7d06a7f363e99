"""Aspect-ratio buckets: images of every shape trained near their own aspect ratio instead of
cropped to a square, as kohya's sd-scripts and NovelAI do. Each bucket is a (width, height) of
about the training area, sides multiples of `step`, from half the resolution to twice it; an
image goes to the bucket nearest its aspect ratio (or, smaller than that bucket, to its own size
rounded down to `step`, unless upscaling is asked for); every batch holds one bucket's images.
"""

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Sampler

from ldm.data.datasets import CaptionedImages
from ldm.images import ImageRefused, opened

Size = tuple[int, int]  # (width, height)


def bucket_sizes(resolution: int, step: int) -> list[Size]:
    """Every (width, height) with sides in [resolution/2, 2·resolution], multiples of `step`, and
    the largest height that keeps the area within resolution² (kohya's make_bucket_resolutions)."""
    low, high, area = max(step, resolution // 2 // step * step), 2 * resolution, resolution * resolution
    sizes = set()
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def assign(size: Size, buckets: list[Size], step: int, upscale: bool) -> Size:
    """The bucket for an image of `size`: nearest in log aspect ratio; an image smaller than it
    (and not to be upscaled) gets its own size, rounded down to `step`."""
    width, height = size
    ratio = math.log(width / height)
    bucket = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    if upscale or (width >= bucket[0] and height >= bucket[1]):
        return bucket
    scale = min(1.0, math.sqrt(bucket[0] * bucket[1] / (width * height)))
    return (max(step, int(width * scale) // step * step), max(step, int(height * scale) // step * step))


def image_size(path: Path) -> Size | None:
    """Read from the header only; None when the file is not a readable image (skipped later)."""
    try:
        with opened(path, str(path)) as image:
            return image.size
    except ImageRefused:
        return None


def bucketed(dataset: CaptionedImages, resolution: int, step: int, upscale: bool) -> CaptionedImages:
    """The dataset with each image's bucket, from its header (an unreadable image keeps the
    square: it is skipped, with its reason, when read)."""
    buckets, square = bucket_sizes(resolution, step), (resolution, resolution)
    sizes = [
        assign(size, buckets, step, upscale) if (size := image_size(path)) else square for path, _ in dataset.entries
    ]
    return CaptionedImages(dataset.entries, dataset.options, sizes, dataset.skipped, dataset.controls)


def table(sizes: list[Size]) -> str:
    """The data summary: how many images each bucket holds, largest count first."""
    counts = Counter(sizes)
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items(), key=lambda item: -item[1]))


class BucketBatchSampler(Sampler):
    """Batches of (epoch, index) from one bucket each. Every epoch, seeded by (seed, epoch): each
    bucket's images shuffled and cut into batches, the batches shuffled and dealt round-robin to
    the processes; starts `skip` batches into this process's share (how a resumed run picks up)."""

    def __init__(self, sizes: list[Size], batch_size: int, seed: int, rank: int = 0, world: int = 1, skip: int = 0):
        self.sizes, self.batch_size, self.seed = sizes, batch_size, seed
        self.rank, self.world, self.skip = rank, world, skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position, epoch = 0, 0
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            groups: dict[Size, list[int]] = {}
            for index, size in enumerate(self.sizes):
                groups.setdefault(size, []).append(index)
            batches = []
            for size in sorted(groups):
                members = [groups[size][i] for i in torch.randperm(len(groups[size]), generator=generator).tolist()]
                batches += [members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size)]
            order = torch.randperm(len(batches), generator=generator).tolist()
            for number in order[self.rank :: self.world]:
                if position >= self.skip:
                    yield [(epoch, index) for index in batches[number]]
                position += 1
            epoch += 1
