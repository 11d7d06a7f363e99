"""Cross-attention maps: for each prompt token, where the image attended to it.

As in DAAM (Tang et al., 2022, "What the DAAM: Interpreting Stable Diffusion Using Cross
Attention"): the attention probabilities of every cross-attention layer, summed over heads,
upsampled to one resolution, and summed over layers and denoising steps.
"""

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.attention import layer_size


class AttentionMapAccumulator:
    """A sink for `capture_attention_probs`: keeps one running (batch, tokens, h, w) sum at
    latent resolution. With classifier-free guidance the UNet batch is [unconditional;
    conditional] and only the conditional half is kept."""

    def __init__(self, batch: int, latent_size: tuple[int, int]):
        self.batch, self.latent_size = batch, latent_size
        self.total: Tensor | None = None
        self.listening = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ignore the UNet calls inside: an unconditional pass run apart from the conditional one."""
        self.listening = False
        try:
            yield
        finally:
            self.listening = True

    def __call__(self, layer: str, probs: Tensor) -> None:
        if not self.listening:
            return
        probs = probs[-self.batch :].float()  # (batch, heads, pixels, tokens)
        batch, _, pixels, tokens = probs.shape
        height, width = layer_size(self.latent_size, pixels)
        maps = probs.sum(dim=1).transpose(1, 2).reshape(batch, tokens, height, width)
        maps = F.interpolate(maps, size=self.latent_size, mode="bilinear", align_corners=False)
        self.total = maps if self.total is None else self.total + maps

    def maps(self, image_size: tuple[int, int]) -> Tensor:
        """(batch, tokens, H, W) at image size, each token's map scaled to [0, 1] by its maximum."""
        assert self.total is not None, "no cross-attention ran"
        maps = F.interpolate(self.total, size=image_size, mode="bicubic", align_corners=False).clamp(min=0)
        return maps / maps.amax(dim=(2, 3), keepdim=True).clamp(min=torch.finfo(maps.dtype).tiny)
