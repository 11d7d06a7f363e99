"""Textual-inversion embeddings: new "words" that are a few learned input vectors of the text encoder.

A prompt word that names an embedding is replaced, before the text encoder, by the embedding's
vectors: they take the places of token embeddings, and the encoder's position embeddings and
layers treat them as any token. The file formats, as AUTOMATIC1111 reads them
(modules/textual_inversion/textual_inversion.py, `load_from_file`, at commit 22ecb78b):

- A1111's `.pt`/`.bin`: {"string_to_param": {"*": (n, width)}, "name", "step", ...}, pickled. Read
  weights-only here: a file holding anything but tensors and plain values is refused.
- `.safetensors` with one tensor, (n, width) or (width,): A1111's own (`emb_params`) and diffusers'
  `learned_embeds.safetensors` ({"<token>": (width,)}), as any single-tensor dict.
- SDXL: {"clip_l": (n, 768), "clip_g": (n, 1280)}, one set of vectors per text encoder.

An embedding is named by its file's stem; its hash is the file's SHA-256 (A1111's `TI hashes`
infotext field writes the first 12 hex digits).
"""

import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ldm.errors import UserError
from ldm.files import file_sha256
from ldm.model import save_safetensors

SUFFIXES = (".pt", ".bin", ".safetensors")
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL's first and second text encoder's vectors


class EmbeddingError(UserError):
    """An embedding file that cannot be read or does not fit the model; one line."""


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: dict[str, Tensor]  # "" for one encoder's (n, width); SDXL's under clip_l and clip_g
    sha256: str = field(repr=False)
    step: int | None = None  # the training step an A1111 .pt records

    @property
    def count(self) -> int:
        """Vectors per use: how many token places the embedding takes in a prompt."""
        return next(iter(self.vectors.values())).shape[0]

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    def for_encoder(self, index: int, encoders: int, width: int) -> Tensor | None:
        """The vectors text encoder `index` (of `encoders`) reads, or None if the file has none of
        that width: SDXL's clip_l for its first encoder and clip_g for its second; a one-encoder
        model takes a plain tensor, or the entry of its width (the SDXL refiner's clip_g)."""
        if encoders == 2:
            vectors = self.vectors.get(SDXL_KEYS[index])
        else:
            vectors = self.vectors.get("", next((v for v in self.vectors.values() if v.shape[-1] == width), None))
        return vectors if vectors is not None and vectors.shape[-1] == width else None


def read_embedding(path: Path) -> Embedding:
    """One embedding file, in any of the formats above."""
    try:
        if path.suffix.lower() == ".safetensors":
            data = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's weights-only reader: a class in the file, or no pickle at all
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found:
            raise EmbeddingError(f"embedding {path}: holds {found.group(1)}, not only tensors; refused") from None
        raise EmbeddingError(f"embedding {path}: not readable (not a PyTorch or safetensors file)") from None
    except (SafetensorError, OSError, RuntimeError, EOFError) as error:
        raise EmbeddingError(f"embedding {path}: not readable ({str(error).splitlines()[0]})") from None
    step = data.get("step") if isinstance(data, dict) else None
    return Embedding(path.stem, _vectors(data, path), file_sha256(path), step if isinstance(step, int) else None)


def _vectors(data: object, path: Path) -> dict[str, Tensor]:
    if isinstance(data, dict) and "string_to_param" in data:
        data = data["string_to_param"]
        if not (isinstance(data, dict) and len(data) == 1):
            raise EmbeddingError(f"embedding {path}: string_to_param must hold one term")
        vectors = {"": next(iter(data.values()))}
    elif isinstance(data, dict) and set(SDXL_KEYS) <= set(data):
        vectors = {key: data[key] for key in SDXL_KEYS}
    elif isinstance(data, dict) and len(data) == 1:
        vectors = {"": next(iter(data.values()))}
    else:
        raise EmbeddingError(f"embedding {path}: not an embedding (string_to_param, one tensor, or clip_l and clip_g)")
    for key, tensor in vectors.items():
        if not isinstance(tensor, Tensor) or tensor.ndim not in (1, 2) or tensor.numel() == 0:
            raise EmbeddingError(f"embedding {path}: {key or 'its tensor'} is not a (vectors, width) tensor")
    vectors = {key: (t[None] if t.ndim == 1 else t).detach().float() for key, t in vectors.items()}
    if len({t.shape[0] for t in vectors.values()}) > 1:
        raise EmbeddingError(f"embedding {path}: clip_l and clip_g hold different numbers of vectors")
    return vectors


def save_embedding(path: Path, vectors: list[Tensor]) -> None:
    """A1111's .safetensors format: one encoder's (n, width) as `emb_params`, SDXL's two as clip_l
    and clip_g."""
    if len(vectors) == 1:
        tensors = {"emb_params": vectors[0]}
    else:
        tensors = dict(zip(SDXL_KEYS, vectors, strict=True))
    save_safetensors(path, {key: value.detach().float().cpu().contiguous() for key, value in tensors.items()})


@contextmanager
def replaced_tokens(text_encoder: nn.Module, rows: list[tuple[int, int, Tensor]]) -> Iterator[None]:
    """While inside, the encoder's token embeddings at (chunk, position) are replaced by the given
    vectors, (n, width) from there on: a forward hook on its token-embedding layer, so the
    position embeddings and every layer after see them as tokens (and gradients reach them)."""

    def replace(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        output = output.clone()
        for chunk, position, vectors in rows:
            output[chunk, position : position + len(vectors)] = vectors.to(output)
        return output

    layer = text_encoder.get_input_embeddings()
    handle = layer.register_forward_hook(replace) if rows else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
