"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023): before each of the first denoising steps the
latents take a gradient step on a loss of the cross-attention maps, so that every subject word the
prompt names gets a place in the picture where it dominates.

As diffusers' StableDiffusionAttendAndExcitePipeline does it (pipelines/deprecated/
stable_diffusion_attend_and_excite, 0.42.1), on the conditional pass:
- the maps: the cross-attention probabilities of the layers at one map size (16x16, or the nearest
  size this UNet has), averaged over those layers and their heads; the first and last tokens
  dropped and the rest re-normalised as softmax(100 p) over the text;
- each chosen token's map smoothed by a 3x3 Gaussian (σ 0.5, reflect-padded) and its maximum taken;
- loss = the most neglected token's max(0, 1 - maximum);
- latents ← latents - α_i ∇loss at steps i < 25, α_i = 20 · √(linspace(1, 0.5, steps)[i]);
- at steps 0, 10 and 20, first iterate (at most 20 times) until loss ≤ 1 - 0.05, 0.5, 0.8.
One difference: the UNet reads the latents through the scheduler's input scaling, as in the
denoising step itself, so samplers whose input is scaled (Euler, Heun, LMS...) work too; for DDIM,
DDPM, PNDM and the others it is the identity, and the pictures are diffusers'.

Which tokens: `attend` names the words ("circle, square": each word's tokens, each word found after
the one before), or token positions (start token 0), or "auto": for prompts of the shapes grammar,
"a [small|large] COLOR SHAPE PLACE [and a COLOR SHAPE PLACE]", each object's colour and shape words.
"""

import math
import re
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.attention import capture_attention_probs, layer_size
from pipelines.settings import GenerationError

MAP_SIZE = 16  # diffusers' attn_res default: the 16x16 maps of SD at 512 px
MAX_STEP = 25  # steps 0..24 are excited (diffusers' max_iter_to_alter)
THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}  # step -> the maximum every token must reach there
REFINEMENTS = 20  # at most this many updates at a threshold step
SCALE = 20.0  # diffusers' scale_factor
OBJECT = re.compile(r"\ba (?:(?:small|large) )?(\S+) (\S+)")  # auto: "a [size] COLOR SHAPE"


def subject_tokens(spec: str, tokens: list[str], prompt: str) -> list[int]:
    """The positions (the start token is 0) of the tokens `spec` names among the prompt's `tokens`
    (their texts, start and end left out)."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if items == ["auto"]:
        objects = OBJECT.findall(prompt)
        if not objects:
            raise GenerationError(f"attend=auto: {prompt!r} has no 'a COLOR SHAPE' to attend to")
        items = [word for pair in objects for word in pair]
    positions: list[int] = []
    start = 0
    for item in items:
        if item.isdigit():
            if not 1 <= int(item) <= len(tokens):
                raise GenerationError(f"attend: token {item} is not in {prompt!r} (1 to {len(tokens)})")
            positions.append(int(item))
            continue
        for word in item.split():
            found = find_word(tokens, word.lower(), start)
            if found is None:
                raise GenerationError(f"attend: {word!r} is not a word of {prompt!r} (after the words before it)")
            positions += [1 + k for k in range(*found)]
            start = found[1]
    return positions


def find_word(tokens: list[str], word: str, start: int) -> tuple[int, int] | None:
    """(first, end) of the first run of tokens from `start` whose texts join to `word` (CLIP splits
    some words: cyan = cy + an)."""
    for first in range(start, len(tokens)):
        joined = ""
        for end in range(first, len(tokens)):
            joined += tokens[end]
            if joined == word:
                return first, end + 1
            if not word.startswith(joined):
                break
    return None


def step_sizes(steps: int) -> np.ndarray:
    return SCALE * np.sqrt(np.linspace(1.0, 0.5, steps))


class AttendExcite:
    """The latent updates of one batch: `tokens[b]` are sample b's subject token positions."""

    def __init__(self, unet: nn.Module, tokens: list[list[int]], latent_size: tuple[int, int]):
        self.unet, self.tokens, self.latent_size = unet, tokens, latent_size
        self.kernel = gaussian_kernel()

    def __call__(self, predict: Callable[[Tensor], Tensor], latents: Tensor, step: int, steps: int) -> Tensor:
        """The latents after step `step` (of `steps`)'s updates; `predict(latents)` runs the
        conditional UNet pass."""
        if step >= MAX_STEP:
            return latents
        size = float(step_sizes(steps)[step])
        with torch.enable_grad():
            latents = latents.detach().requires_grad_(True)
            loss = self.loss(predict, latents)
            if step in THRESHOLDS:
                latents, loss = self._refine(predict, latents, loss, 1.0 - THRESHOLDS[step], size)
            return self._update(latents, loss, size)

    def _refine(self, predict, latents: Tensor, loss: Tensor, target: float, size: float) -> tuple[Tensor, Tensor]:
        """Update each sample whose loss is above `target` until it is not (as diffusers: its loss is
        checked before each update, so the last update lands one past it), then measure again."""
        active = loss.detach() > target
        if not active.any():
            return latents, loss
        for _ in range(REFINEMENTS):
            latents = latents.detach().requires_grad_(True)
            loss = self.loss(predict, latents)
            latents = self._update(latents, loss * active, size)
            active &= loss.detach() > target
            if not active.any():
                break
        latents = latents.detach().requires_grad_(True)
        return latents, self.loss(predict, latents)

    @staticmethod
    def _update(latents: Tensor, loss: Tensor, size: float) -> Tensor:
        """One gradient step of each sample on its own loss (the samples do not mix in the UNet)."""
        (gradient,) = torch.autograd.grad(loss.sum(), [latents])
        return (latents - size * gradient).detach()

    def loss(self, predict: Callable[[Tensor], Tensor], latents: Tensor) -> Tensor:
        """(batch,): the most neglected subject token's max(0, 1 - its smoothed maximum attention)."""
        layers: list[Tensor] = []
        with capture_attention_probs(self.unet, lambda _, probs: layers.append(probs.float().mean(dim=1))):
            predict(latents)  # each layer's (batch, pixels, tokens), its heads averaged
        pixels = nearest_map([layer.shape[1] for layer in layers])
        maps = torch.stack([layer for layer in layers if layer.shape[1] == pixels]).mean(dim=0)
        height, width = layer_size(self.latent_size, pixels)
        text = (100 * maps[:, :, 1:-1]).softmax(dim=-1)
        losses = []
        for b, positions in enumerate(self.tokens):
            grids = text[b][:, [p - 1 for p in positions]].T.reshape(len(positions), 1, height, width)
            smoothed = F.conv2d(F.pad(grids, (1, 1, 1, 1), mode="reflect"), self.kernel.to(grids))
            losses.append((1.0 - smoothed.amax(dim=(1, 2, 3))).clamp(min=0).max())
        return torch.stack(losses)


def nearest_map(sizes: list[int]) -> int:
    """The pixels of the maps the loss reads: 16x16 where the UNet has them, else the nearest size."""
    wanted = MAP_SIZE * MAP_SIZE
    return min(set(sizes), key=lambda pixels: (abs(math.log(pixels / wanted)), -pixels))


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> Tensor:
    """(1, 1, 3, 3), summing to 1: diffusers' GaussianSmoothing, exp(-((x - mean) / (2σ))²) per axis."""
    axis = torch.arange(size, dtype=torch.float32)
    one = torch.exp(-(((axis - (size - 1) / 2) / (2 * sigma)) ** 2)) / (sigma * math.sqrt(2 * math.pi))
    kernel = one[:, None] * one[None, :]
    return (kernel / kernel.sum())[None, None]
