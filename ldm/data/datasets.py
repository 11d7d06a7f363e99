"""Captioned image datasets in three formats, chosen by what `path` holds:

1. a folder of images (png, jpg, jpeg, webp, bmp), each with a same-stem .txt caption, searched recursively;
2. a folder with metadata.jsonl or metadata.csv: `file_name` and a caption column (Hugging Face imagefolder);
3. WebDataset tar shards (a folder of .tar files, or one .tar): image plus .txt or .json caption, streamed.

Optionally, for the grounding loss, boxes of caption words beside each image: NAME.boxes.json
beside NAME.png (formats 1 and 2), or a .boxes.json member (3), holding {"word": [[x0, y0, x1,
y1], ...]} in the source image's pixels; they follow the image's resize, crop and flip.

With `ImageOptions.masks` (the masked loss), each item also has a "mask" (1, H, W) in [0, 1]: the
grey level of NAME_mask.png beside NAME.png (a `mask.png` member in shards), else the image's
alpha channel, else all ones. A NAME_mask.png beside NAME.png is never a training image itself,
nor is a NAME_control.png (a ControlNet's control image, which the shapes generator writes with --layouts).

With `ImageOptions.controls` (a ControlNet's training), each item also has a "control" (3, H, W)
in [0, 1], placed as its image: NAME_control.png beside NAME.png, the `conditioning_image` column
of a metadata file (the column diffusers' train_controlnet.py reads), or a `control.png` member in
shards. An item without one is skipped, saying so.

A bad item (unreadable, truncated or empty image, missing or unreadable caption, too small) is
not an error: it comes out as a `Skipped` record, which the collate function sets aside for the
training loop to warn about and count. For folders and metadata files, every image's header is
opened up front (no pixels decoded): a file that is no image, or one too large to decode (PIL's
decompression-bomb limit, 178 M pixels), and a metadata line that cannot be read, are set aside
in `CaptionedImages.skipped` before the first step, named with file and line.
"""

import csv
import itertools
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from ldm.data.transforms import BadItem, Placement, alpha_of, prepare_control, prepare_image, prepare_mask
from ldm.errors import UserError
from ldm.images import ImageRefused, opened, unreadable

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CONTROL_COLUMN = "conditioning_image"  # diffusers' train_controlnet.py: --conditioning_image_column's default
UNREADABLE = (OSError, ValueError, SyntaxError)  # PIL's ways of saying "not an image" while decoding or placing it


class DatasetError(UserError):
    """The dataset as a whole cannot be used: the message says why."""


@dataclass(frozen=True)
class ImageOptions:
    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    seed: int = 0
    upscale: bool = False  # images smaller than their training size: enlarged instead of skipped
    masks: bool = False  # each item gets a "mask": its NAME_mask.png, its alpha channel, or ones
    controls: bool = False  # each item gets a "control": its control image (a ControlNet's training)


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str


def boxes_file(image: Path) -> Path:
    return image.with_name(image.stem + ".boxes.json")


def mask_file(image: Path) -> Path:
    return image.with_name(image.stem + "_mask.png")


def control_file(image: Path) -> Path:
    return image.with_name(image.stem + "_control.png")


def has_mask(image: Path) -> bool:
    """Whether the image has a NAME_mask.png or an alpha channel (its header is read, not its pixels)."""
    if mask_file(image).is_file():
        return True
    try:
        with opened(image, str(image)) as file:
            return "A" in file.getbands() or "transparency" in file.info
    except ImageRefused:
        return False


def read_boxes(text: str | bytes, placement: Placement) -> list[list]:
    """A .boxes.json's {"word": [[x0, y0, x1, y1], ...]} as [word, x0, y0, x1, y1] rows in
    fractions of the training square (boxes cropped away are dropped)."""
    rows = []
    try:
        for word, group in json.loads(text).items():
            for box in group:
                x0, y0, x1, y1 = map(float, box)
                placed = placement.box((x0, y0, x1, y1))
                if placed is not None:
                    rows.append([str(word), *placed])
    except (ValueError, TypeError, AttributeError) as error:  # not JSON, or not {word: [[4 numbers], ...]}
        raise BadItem(f"unreadable boxes ({type(error).__name__}: {error})") from None
    return rows


def load_item(
    image: Path | bytes,
    caption: str | None,
    source: str,
    options: ImageOptions,
    key: list[int],
    boxes: str | bytes | None = None,
    size: tuple[int, int] | None = None,
    mask: Path | bytes | None = None,
    control: Path | bytes | None = None,
):
    """One example as {"pixels", "caption", "size_ids"} (and "boxes" when given, "mask" with
    options.masks, "control" with options.controls), or Skipped. `key` seeds this item's crop and
    flip; `size` (width, height) is its bucket's, else the square resolution. "size_ids" are SDXL's
    six size and crop numbers (Placement.size_ids). `mask` is the mask file's path or bytes; without
    it, the alpha channel. `control` is the control image's path or bytes."""
    try:
        if caption is None or not caption.strip():
            raise BadItem("no caption")
        with opened(image, source) as file:
            file.load()
            pixels, placement = prepare_image(
                file, size or (options.resolution, options.resolution), options.center_crop, options.random_flip,
                np.random.default_rng(key), options.upscale,
            )  # fmt: skip
            alpha = alpha_of(file) if options.masks and mask is None else None
        item = {"pixels": pixels, "caption": caption.strip(), "size_ids": torch.tensor(placement.size_ids()).float()}
        if options.masks and mask is not None:
            try:
                with opened(mask, "mask") as file:
                    item["mask"] = prepare_mask(file, placement)
            except ImageRefused as error:
                raise BadItem(f"mask: {error.reason}") from None
            except UNREADABLE as error:
                raise BadItem(f"mask: {unreadable(error)}") from None
        elif options.masks:
            item["mask"] = prepare_mask(alpha, placement)
        if options.controls:
            item["control"] = read_control(control, placement)
        if boxes is not None:
            item["boxes"] = read_boxes(boxes, placement)
        return item
    except BadItem as error:
        return Skipped(source, str(error))
    except ImageRefused as error:
        return Skipped(source, error.reason)
    except UNREADABLE as error:
        return Skipped(source, unreadable(error))


def read_control(control: Path | bytes | None, placement: Placement) -> torch.Tensor:
    if control is None:
        raise BadItem("no control image")
    try:
        with opened(control, "control image") as file:
            return prepare_control(file, placement)
    except ImageRefused as error:
        if error.reason == "no such file":
            raise BadItem(f"no control image ({Path(str(control)).name})") from None
        raise BadItem(f"control image: {error.reason}") from None
    except UNREADABLE as error:
        raise BadItem(f"control image: {unreadable(error)}") from None


class CaptionedImages(Dataset):
    """Formats 1 and 2: a list of (image file, caption) known up front. Indexed by (epoch, index)
    pairs from `EpochSampler`, so each epoch's crops and flips are fixed by the seed."""

    def __init__(
        self,
        entries: list[tuple[Path, str | Path | None]],
        options: ImageOptions,
        sizes: list[tuple[int, int]] | None = None,
        skipped: dict[str, str] | None = None,
        controls: dict[Path, Path] | None = None,
    ):
        self.entries, self.options = entries, options
        self.sizes = sizes  # each entry's bucket (width, height); None: all square
        self.skipped = skipped or {}  # source -> why, found before training (checked_images)
        self.controls = controls or {}  # image -> its control image (a ControlNet's), where it has one

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, epoch_index: tuple[int, int]):
        epoch, index = epoch_index
        image, caption = self.entries[index]
        if isinstance(caption, Path):
            try:
                caption = caption.read_text(encoding="utf-8")
            except FileNotFoundError:
                return Skipped(str(image), f"no caption file ({caption.name})")
            except (OSError, UnicodeDecodeError) as error:
                return Skipped(str(image), f"unreadable caption ({caption.name}: {type(error).__name__})")
        boxes = boxes_file(image)
        try:
            boxes = boxes.read_bytes() if boxes.is_file() else None
        except OSError as error:
            return Skipped(str(image), f"unreadable boxes ({boxes.name}: {type(error).__name__})")
        size = self.sizes[index] if self.sizes else None
        mask = mask_file(image) if self.options.masks and mask_file(image).is_file() else None
        key = [self.options.seed, epoch, index]
        return load_item(image, caption, str(image), self.options, key, boxes, size, mask, self.controls.get(image))


class EpochSampler(Sampler):
    """Each epoch a permutation seeded by (seed, epoch), dealt round-robin to the processes;
    starts `skip` items into this process's share, which is how a resumed run picks up."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, skip: int = 0):
        self.size, self.seed, self.rank, self.world, self.skip = size, seed, rank, world, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position, epoch = 0, 0
        while True:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for index in order[self.rank :: self.world]:
                if position >= self.skip:
                    yield epoch, index
                position += 1
            epoch += 1


class TarShards(IterableDataset):
    """Format 3: WebDataset tars read member by member with the standard library, one shard per
    (process, worker) in turn, so nothing is unpacked to disk and every shard is read by one reader."""

    def __init__(self, shards: list[Path], options: ImageOptions, caption_column: str, rank: int = 0, world: int = 1):
        self.shards, self.options, self.caption_column = shards, options, caption_column
        self.rank, self.world = rank, world
        # Items of this process's stream already consumed (set when resuming). With several
        # workers the stream interleaves by batch, so a resumed shard run continues at the same
        # count of items, not necessarily the same items; folder datasets resume exactly.
        self.skip = 0

    def one_pass(self) -> Iterator:
        """Every item of every shard once, in order."""
        for index, shard in enumerate(self.shards):
            yield from self._read(shard, 0, index)

    def __iter__(self):
        worker = get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        readers, reader = self.world * workers, self.rank * workers + worker_id
        return itertools.islice(self._stream(reader, readers), self.skip // workers, None)

    def _stream(self, reader: int, readers: int) -> Iterator:
        epoch = 0
        while True:
            for shard_index in range(reader, len(self.shards), readers):
                yield from self._read(self.shards[shard_index], epoch, shard_index)
            epoch += 1

    def _read(self, shard: Path, epoch: int, shard_index: int):
        samples: dict[str, dict[str, bytes]] = {}
        order: list[str] = []
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.partition(".")
                if key not in samples:
                    order.append(key)
                samples.setdefault(key, {})[suffix.lower()] = tar.extractfile(member).read()
        for number, key in enumerate(order):
            files = samples[key]
            image = next((files[s[1:]] for s in IMAGE_SUFFIXES if s[1:] in files), None)
            source = f"{shard.name}:{key}"
            if image is None:
                yield Skipped(source, "no image file")
                continue
            key = [self.options.seed, epoch, shard_index, number]
            boxes, mask, control = files.get("boxes.json"), files.get("mask.png"), files.get("control.png")
            yield load_item(image, self._caption(files), source, self.options, key, boxes, mask=mask, control=control)

    def _caption(self, files: dict[str, bytes]) -> str | None:
        try:
            if "txt" in files:
                return files["txt"].decode("utf-8")
            if "json" in files:
                return json.loads(files["json"]).get(self.caption_column)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return None
        return None


def collate(items: list) -> dict:
    """Stack the good items' tensors ("pixels", or cached latents); list their captions and boxes
    (None for an item without); hand the skipped ones on for the loop to report."""
    good = [item for item in items if not isinstance(item, Skipped)]
    batch = {
        "captions": [item["caption"] for item in good],
        "skipped": [item for item in items if isinstance(item, Skipped)],
    }
    if any("boxes" in item for item in good):
        batch["boxes"] = [item.get("boxes") for item in good]
    for name in good[0] if good else ():
        if name not in ("caption", "boxes"):
            batch[name] = torch.stack([item[name] for item in good])
    return batch


def open_dataset(
    path: str | Path,
    options: ImageOptions,
    caption_column: str = "text",
    rank: int = 0,
    world: int = 1,
    caption_extension: str = ".txt",
):
    """The dataset at `path`, in whichever of the three formats it is."""
    path = Path(path)
    if path.is_file() and path.suffix == ".tar":
        return TarShards([path], options, caption_column, rank, world)
    if not path.is_dir():
        raise DatasetError(f"data.path={str(path)!r}: no such folder or .tar file")
    shards = sorted(path.glob("*.tar"))
    if shards:
        return TarShards(shards, options, caption_column, rank, world)
    for name in ("metadata.jsonl", "metadata.csv"):
        if (path / name).is_file():
            entries, bad, controls = read_metadata(path / name, caption_column)
            return checked_images(entries, bad, options, controls)
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    stems = {image.with_suffix("") for image in images}
    images = [image for image in images if not _beside_its_image(image, stems)]
    if not images:
        raise DatasetError(
            f"data.path={str(path)!r}: no images ({', '.join(IMAGE_SUFFIXES)}), metadata file or .tar shards"
        )
    entries = [(image, image.with_suffix(caption_extension)) for image in images]
    controls = {image: control_file(image) for image in images if control_file(image).is_file()}
    return checked_images(entries, {}, options, controls)


def _beside_its_image(image: Path, stems: set[Path]) -> bool:
    """NAME_mask.png beside an image named NAME is that image's loss mask, NAME_control.png its
    control image (a ControlNet's): neither is a training image."""
    return any(
        image.name.endswith(end) and image.with_name(image.name[: -len(end)]) in stems
        for end in ("_mask.png", "_control.png")
    )


def checked_images(
    entries: list, bad: dict[str, str], options: ImageOptions, controls: dict[Path, Path]
) -> CaptionedImages:
    """The entries whose image header opens (fast: no pixels decoded); the others, with `bad`
    (unreadable metadata lines), go to `skipped` now instead of when training reaches them."""
    bad, good = dict(bad), []
    for image, caption in entries:
        try:
            with opened(image, str(image)):
                good.append((image, caption))
        except ImageRefused as error:
            bad[str(image)] = error.reason
    return CaptionedImages(good, options, skipped=bad, controls=controls)


def read_metadata(
    file: Path, caption_column: str
) -> tuple[list[tuple[Path, str | None]], dict[str, str], dict[Path, Path]]:
    """(image, caption) rows of a metadata.jsonl / metadata.csv, paths relative to its folder; the
    jsonl lines that are not a JSON object with a file_name, by `FILE:LINE`; and each image's
    control image, from the `conditioning_image` column where it has one."""
    bad: dict[str, str] = {}
    if file.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError as error:
                bad[f"{file}:{number}"] = f"not a JSON line ({error})"
                continue
            if row is not None and not (isinstance(row, dict) and isinstance(row.get("file_name"), str)):
                bad[f"{file}:{number}"] = "not a JSON object with a file_name"
            elif row is not None:
                rows.append(row)
    else:
        with file.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    if rows and "file_name" not in rows[0]:
        raise DatasetError(f"{file}: no file_name column")
    if rows and caption_column not in rows[0]:
        raise DatasetError(
            f"{file}: no caption column {caption_column!r} (set data.caption_column; has {sorted(rows[0])})"
        )
    entries = [(file.parent / row["file_name"], row.get(caption_column)) for row in rows]
    controls = {
        file.parent / row["file_name"]: file.parent / row[CONTROL_COLUMN]
        for row in rows
        if isinstance(row.get(CONTROL_COLUMN), str) and row[CONTROL_COLUMN]
    }
    return entries, bad, controls


def check_usable(dataset: CaptionedImages | TarShards) -> None:
    """Stop before training if not one item can be used, saying why the items failed."""
    if isinstance(dataset, CaptionedImages):
        items = (dataset[(0, index)] for index in range(len(dataset)))
    else:
        items = dataset.one_pass()
    reasons: Counter[str] = Counter(reason.split(" (")[0] for reason in getattr(dataset, "skipped", {}).values())
    for item in items:
        if not isinstance(item, Skipped):
            return
        reasons[item.reason.split(" (")[0]] += 1
    summary = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
    raise DatasetError(f"no usable item among {sum(reasons.values())}: {summary}")
