"""Latent caching: encode every training image with the frozen VAE once (and every caption with
the frozen text encoders: SDXL's two, with the pooled embedding), store the results as
safetensors, and train from those. Each image's size ids (SDXL's original size, crop and target)
are kept with its latents, as the crop they record is the one cached; so are loss masks, averaged
over each latent pixel's area (what the masked loss does with them), and control images (a
ControlNet's training), at pixel size in 8 bits, as their files hold them.

The cache file is named by a fingerprint of the dataset (files, sizes, modification times,
captions, grounding boxes, masks, control images, resolution, crop) and of the encoders' weights, so it is reused
exactly while they are unchanged and rebuilt when anything changes. The VAE posterior is kept
(mean and std), not one sample of it, so every step still draws a fresh latent, as without the
cache.
"""

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.data import Dataset

from ldm.data.datasets import CaptionedImages, Skipped, boxes_file, collate, mask_file
from ldm.model import LatentDiffusion, save_safetensors
from ldm.text import encode_captions


class CachedExamples(Dataset):
    """Indexed by (epoch, index) like CaptionedImages; items are posteriors (and text), not pixels.
    With aspect-ratio buckets, each bucket's posteriors are stacked apart (`latent_mean@WxH`) and
    `rows` says where each item's are; `sizes` are the buckets, for the batch sampler."""

    def __init__(
        self,
        tensors: dict[str, Tensor],
        captions: list[str | None],
        reasons: dict[int, list[str]],
        boxes: list[list | None],
        rows: list[tuple[str, int]] | None = None,
        sizes: list[tuple[int, int]] | None = None,
    ):
        self.empty_text = tensors.pop("empty_text", None)  # the empty caption's embedding, when text is cached
        self.empty_pooled = tensors.pop("empty_pooled", None)  # and its pooled one (SDXL)
        self.tensors, self.captions, self.reasons, self.boxes = tensors, captions, reasons, boxes
        self.rows, self.sizes = rows, sizes

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, epoch_index: tuple[int, int]):
        index = epoch_index[1]
        if index in self.reasons:
            return Skipped(*self.reasons[index])
        bucket, row = self.rows[index] if self.rows else ("", index)
        item = {name: self.tensors[name + bucket][row] for name in ("latent_mean", "latent_std")}
        if "mask" + bucket in self.tensors:
            item["mask"] = self.tensors["mask" + bucket][row]
        if "control" + bucket in self.tensors:
            item["control"] = self.tensors["control" + bucket][row].float() / 255
        item["size_ids"] = self.tensors["size_ids"][index]
        for name in ("text", "pooled"):
            if name in self.tensors:
                item[name] = self.tensors[name][index]
        if self.boxes[index] is not None:
            item["boxes"] = self.boxes[index]
        return item | {"caption": self.captions[index]}


CACHE_VERSION = 5  # 2: captions cleaned as CLIP cleans text before they are encoded; 3: size ids; 4: masks;
# 5: control images


def fingerprint(dataset: CaptionedImages, encoders: list[nn.Module]) -> str:
    digest = hashlib.sha256(f"cache v{CACHE_VERSION}".encode())
    digest.update(json.dumps(vars(dataset.options), sort_keys=True).encode())
    for image, caption in dataset.entries:
        stat = image.stat() if image.exists() else None
        digest.update(f"{image}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}".encode())
        text = caption.read_bytes() if isinstance(caption, Path) and caption.exists() else str(caption).encode()
        digest.update(text)
        boxes = boxes_file(image)
        digest.update(boxes.read_bytes() if boxes.is_file() else b"no boxes")
        mask = mask_file(image)
        if dataset.options.masks and mask.is_file():
            digest.update(mask.read_bytes())
        control = dataset.controls.get(image)
        if dataset.options.controls:
            digest.update(control.read_bytes() if control is not None and control.is_file() else b"no control")
    if dataset.sizes:  # the buckets, too
        digest.update(json.dumps(dataset.sizes).encode())
    for encoder in encoders:
        for name, tensor in encoder.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


@torch.no_grad()
def build_cache(
    dataset: CaptionedImages,
    model: LatentDiffusion,
    cache_text: bool,
    folder: Path,
    device: torch.device,
    batch: int = 32,
) -> Path:
    """Encode what is not cached yet; return the cache file. A bucketed dataset is encoded bucket
    by bucket, each bucket's posteriors in a stack of their own."""
    encoders = [model.vae] + ([encoder for _, encoder in model.text_encoders()] if cache_text else [])
    path = folder / f"latents-{fingerprint(dataset, encoders)}.safetensors"
    if path.exists():
        return path
    count = len(dataset)
    groups: dict[str, list[int]] = {}  # bucket suffix ("" without buckets) -> its items, in order
    for index in range(count):
        size = dataset.sizes[index] if dataset.sizes else None
        groups.setdefault(f"@{size[0]}x{size[1]}" if size else "", []).append(index)
    tensors: dict[str, Tensor] = {}
    captions, boxes, rows = [None] * count, [None] * count, [("", 0)] * count
    texts, pooled, size_ids = [None] * count, [None] * count, torch.zeros(count, 6)
    reasons: dict[int, list[str]] = {}
    for bucket, indices in groups.items():
        means, stds, masks, controls = [], [], [], []
        for start in range(0, len(indices), batch):
            chunk = indices[start : start + batch]
            items = [dataset[(0, index)] for index in chunk]
            for row, (index, item) in enumerate(zip(chunk, items, strict=True), start=start):
                rows[index] = (bucket, row)
                if isinstance(item, Skipped):
                    reasons[index] = [item.source, item.reason]
                else:
                    captions[index], boxes[index], size_ids[index] = (
                        item["caption"],
                        item.get("boxes"),
                        item["size_ids"],
                    )
            good = collate(items)
            if not good["captions"]:
                blank = torch.zeros(len(items))
                means.append(blank), stds.append(blank), masks.append(blank), controls.append(blank)
                continue
            posterior = model.vae.encode(good["pixels"].to(device)).latent_dist
            keep = [i for i, item in enumerate(items) if isinstance(item, dict)]
            means.append(_scatter(posterior.mean.cpu(), keep, len(items)))
            stds.append(_scatter(posterior.std.cpu(), keep, len(items)))
            if "mask" in good:
                pooled_mask = F.interpolate(good["mask"], size=posterior.mean.shape[-2:], mode="area")
                masks.append(_scatter(pooled_mask, keep, len(items)))
            if "control" in good:  # back to the bytes it was read from: a quarter of the size
                controls.append(_scatter((good["control"] * 255).round().to(torch.uint8), keep, len(items)))
            if cache_text:
                text, pool = encode_captions(model.text_encoders(), good["captions"], model.is_sdxl)
                for row, i in enumerate(keep):
                    texts[chunk[i]] = text[row].cpu()
                    pooled[chunk[i]] = None if pool is None else pool[row].cpu()
        tensors |= {"latent_mean" + bucket: _stack(means), "latent_std" + bucket: _stack(stds)}
        if dataset.options.masks:
            tensors["mask" + bucket] = _stack(masks)
        if dataset.options.controls:
            tensors["control" + bucket] = _stack(controls).to(torch.uint8)
    tensors["size_ids"] = size_ids
    if cache_text:
        empty_text, empty_pooled = encode_captions(model.text_encoders(), [""], model.is_sdxl)
        tensors |= {"text": _rows(texts), "empty_text": empty_text[0].cpu()}
        if empty_pooled is not None:
            tensors |= {"pooled": _rows(pooled), "empty_pooled": empty_pooled[0].cpu()}
    metadata = {"captions": json.dumps(captions), "reasons": json.dumps(reasons), "boxes": json.dumps(boxes)}
    if dataset.sizes:
        metadata |= {"rows": json.dumps(rows), "sizes": json.dumps(dataset.sizes)}
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, tensors, metadata)
    return path


def _rows(values: list[Tensor | None]) -> Tensor:
    """One row per item, zeros for a skipped one."""
    shape = next(value.shape for value in values if value is not None)
    return torch.stack([value if value is not None else torch.zeros(shape) for value in values])


def _scatter(values: Tensor, keep: list[int], size: int) -> Tensor:
    """Rows for the good items, zeros where an item was skipped."""
    out = torch.zeros(size, *values.shape[1:], dtype=values.dtype)
    out[keep] = values
    return out


def _stack(chunks: list[Tensor]) -> Tensor:
    """Concatenate, giving all-skipped chunks (1-D placeholders) the shape of the others."""
    shape = next(chunk.shape[1:] for chunk in chunks if chunk.ndim > 1)
    return torch.cat([chunk if chunk.ndim > 1 else torch.zeros(len(chunk), *shape) for chunk in chunks])


def load_cache(path: Path) -> CachedExamples:
    with safe_open(path, framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
        metadata = file.metadata()
    reasons = {int(k): v for k, v in json.loads(metadata["reasons"]).items()}
    rows = [tuple(row) for row in json.loads(metadata["rows"])] if "rows" in metadata else None
    sizes = [tuple(size) for size in json.loads(metadata["sizes"])] if "sizes" in metadata else None
    captions, boxes = json.loads(metadata["captions"]), json.loads(metadata["boxes"])
    return CachedExamples(tensors, captions, reasons, boxes, rows, sizes)
