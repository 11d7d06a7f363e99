"""What the UNet reads besides the latents and the timestep: the prompts' token embeddings, and for
SDXL the pooled text and the six size numbers ("time ids"): the original size, the crop's top-left
corner and the target size, each (height, width), as the model was trained to reproduce them.
The SDXL refiner reads five: an aesthetic score in place of the target size.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from ldm.model import LatentDiffusion
from pipelines.choices import SIZE_CONDITIONING
from pipelines.embeddings import EmbeddingFolder
from pipelines.prompts import Encoded, encode_weighted, pad_with_chunk


class Conditioning(NamedTuple):
    """The UNet's arguments after the latents and the timestep, one row per image."""

    text: Tensor  # (batch, tokens, width) token embeddings
    pooled: Tensor | None = None  # SDXL: (batch, width) pooled text
    time_ids: Tensor | None = None  # SDXL: (batch, 6) original size, crop top-left, target size (refiner: 5)

    def repeat(self, batch: int) -> "Conditioning":
        return Conditioning(*(None if t is None else t.expand(batch, *t.shape[1:]) for t in self))

    @staticmethod
    def cat(first: "Conditioning", second: "Conditioning") -> "Conditioning":
        return Conditioning(*(None if a is None else torch.cat([a, b]) for a, b in zip(first, second, strict=True)))


def time_ids(
    sizes: dict[str, tuple[int, int]],
    prefix: str,
    device: torch.device,
    dtype: torch.dtype,
    aesthetic_score: float | None = None,
) -> Tensor:
    """(1, 6) time ids from the resolved sizes; the negative ones with prefix 'negative_'. The
    refiner's (1, 5): the aesthetic score in place of the target size (diffusers' _get_add_time_ids
    with requires_aesthetics_score)."""
    names = SIZE_CONDITIONING[: 2 if aesthetic_score is not None else 3]
    ids = [value for name in names for value in sizes[prefix + name]]
    ids += [] if aesthetic_score is None else [aesthetic_score]
    return torch.tensor([ids], device=device, dtype=dtype)


def encode_batch(
    model: LatentDiffusion,
    prompts: list[str],
    emphasis: str,
    truncate: bool,
    ids: Tensor | None,
    prompt_2: str | None = None,
    embeddings: EmbeddingFolder | None = None,
) -> Conditioning:
    """The prompts' conditioning (`ids`: SDXL's time ids, one row; `prompt_2`: what its second
    encoder reads instead of each prompt), each prompt encoded at its own length; in a batch of
    prompts of different lengths, the shorter ones are padded with the empty prompt's chunk.
    `embeddings`: the textual-inversion embeddings the prompts may name."""
    encoders, sdxl = model.text_encoders(), model.is_sdxl
    encoded = {
        prompt: encode_weighted(encoders, prompt, emphasis, truncate, prompt_2, sdxl, embeddings) for prompt in prompts
    }
    longest = max(e.text.shape[1] for e in encoded.values())
    if any(e.text.shape[1] < longest for e in encoded.values()):
        empty = encode_weighted(encoders, "", emphasis, truncate, penultimate=sdxl).text
        for prompt, (text, pooled) in encoded.items():
            encoded[prompt] = Encoded(pad_with_chunk(text, empty, longest), pooled)
    text = torch.cat([encoded[p].text for p in prompts])
    if not model.is_sdxl:
        return Conditioning(text)
    pooled = torch.cat([encoded[p].pooled for p in prompts])
    return Conditioning(text, pooled, ids.expand(len(prompts), -1))


def zero_negative(model: LatentDiffusion, ids: Tensor) -> Conditioning:
    """SDXL's force_zeros_for_empty_prompt: the unguided prediction reads zeros, not the empty
    prompt's embedding (diffusers' encode_prompt, when no negative prompt is given)."""
    context = model.text_encoders()[0][0].model_max_length
    zeros = torch.zeros(1, context, model.unet.config.cross_attention_dim)
    pooled = torch.zeros(1, model.text_encoder_2.config.projection_dim)
    return Conditioning(zeros.to(ids), pooled.to(ids), ids)
