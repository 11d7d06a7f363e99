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

Binding (in the spirit of SynGen, Rassin et al., NeurIPS 2023): an item of several words ("red
circle") is one subject, its last word the noun and the others its modifiers. The loss adds, for
each sample, the mean divergence of each modifier's map from its noun's, and one minus the mean
divergence of each subject's words from every other subject's, so that "red" lands where "circle"
is and not where "square" is. SynGen's symmetric KL is unbounded, and on the demo model even a
weight of 0.1 for it wrecked every picture; the Jensen-Shannon divergence (over ln 2, so 0..1) keeps
the term on the scale of the excite loss. The thresholds of the refinement steps read the excite
loss alone.

Which tokens: `attend` names the words ("circle, square": each word's tokens, each word found after
the one before), or token positions (start token 0), or "auto": for prompts of the shapes grammar,
"a [small|large] COLOR SHAPE PLACE [and a COLOR SHAPE PLACE]", each object's colour and shape, one
subject each, when there are two or more; a lone object is left alone (nothing competes with it,
and on the demo model exciting it cost single objects 24 points: docs/generation.md).
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
BIND = 0.1  # the binding term's weight: at 1.0 the demo model lost its positions (docs/generation.md)
OBJECT = re.compile(r"\ba (?:(?:small|large) )?(\S+) (\S+)")  # auto: "a [size] COLOR SHAPE"


Subject = list[list[int]]  # its words' token positions, the noun last


def subjects(spec: str, tokens: list[str], prompt: str) -> list[Subject]:
    """The subjects `spec` names among the prompt's `tokens` (their texts, start and end left out):
    each item's words, as the positions of their tokens (the start token is 0); none for "auto" on a
    prompt of one object."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if items == ["auto"]:
        objects = OBJECT.findall(prompt)
        if not objects:
            raise GenerationError(f"attend=auto: {prompt!r} has no 'a COLOR SHAPE' to attend to")
        items = [" ".join(pair) for pair in objects] if len(objects) > 1 else []
    found: list[Subject] = []
    start = 0
    for item in items:
        if item.isdigit():
            if not 1 <= int(item) <= len(tokens):
                raise GenerationError(f"attend: token {item} is not in {prompt!r} (1 to {len(tokens)})")
            found.append([[int(item)]])
            continue
        words = []
        for word in item.split():
            span = find_word(tokens, word.lower(), start)
            if span is None:
                raise GenerationError(f"attend: {word!r} is not a word of {prompt!r} (after the words before it)")
            words.append([1 + k for k in range(*span)])
            start = span[1]
        found.append(words)
    return found


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
    """The latent updates of one batch: `subjects[b]` are sample b's subjects (none: not updated)."""

    def __init__(self, unet: nn.Module, subjects: list[list[Subject]], latent_size: tuple[int, int]):
        self.unet, self.subjects, self.latent_size = unet, subjects, latent_size
        self.kernel = gaussian_kernel()

    def __call__(self, predict: Callable[[Tensor], Tensor], latents: Tensor, step: int, steps: int) -> Tensor:
        """The latents after step `step` (of `steps`)'s updates; `predict(latents)` runs the
        conditional UNet pass."""
        if step >= MAX_STEP:
            return latents
        size = float(step_sizes(steps)[step])
        with torch.enable_grad():
            latents = latents.detach().requires_grad_(True)
            excite, loss = self.loss(predict, latents)
            if step in THRESHOLDS:
                latents, loss = self._refine(predict, latents, excite, loss, 1.0 - THRESHOLDS[step], size)
            return self._update(latents, loss, size)

    def _refine(
        self, predict, latents: Tensor, excite: Tensor, loss: Tensor, target: float, size: float
    ) -> tuple[Tensor, Tensor]:
        """Update each sample whose excite loss is above `target` until it is not (as diffusers: it is
        checked before each update, so the last update lands one past it), then measure again."""
        active = excite.detach() > target
        if not active.any():
            return latents, loss
        for _ in range(REFINEMENTS):
            latents = latents.detach().requires_grad_(True)
            excite, loss = self.loss(predict, latents)
            latents = self._update(latents, loss * active, size)
            active &= excite.detach() > target
            if not active.any():
                break
        latents = latents.detach().requires_grad_(True)
        return latents, self.loss(predict, latents)[1]

    @staticmethod
    def _update(latents: Tensor, loss: Tensor, size: float) -> Tensor:
        """One gradient step of each sample on its own loss (the samples do not mix in the UNet)."""
        (gradient,) = torch.autograd.grad(loss.sum(), [latents])
        return (latents - size * gradient).detach()

    def loss(self, predict: Callable[[Tensor], Tensor], latents: Tensor) -> tuple[Tensor, Tensor]:
        """(batch,) each: the excite loss, the most neglected subject token's max(0, 1 - its smoothed
        maximum attention); and the whole loss, that plus BIND times the binding term."""
        layers: list[Tensor] = []
        with capture_attention_probs(self.unet, lambda _, probs: layers.append(probs.float().mean(dim=1))):
            predict(latents)  # each layer's (batch, pixels, tokens), its heads averaged
        pixels = nearest_map([layer.shape[1] for layer in layers])
        maps = torch.stack([layer for layer in layers if layer.shape[1] == pixels]).mean(dim=0)
        height, width = layer_size(self.latent_size, pixels)
        text = (100 * maps[:, :, 1:-1]).softmax(dim=-1)
        excite, bind = [], []
        for b, found in enumerate(self.subjects):
            if not found:
                excite.append(text.new_zeros(()))
                bind.append(text.new_zeros(()))
                continue
            positions = [p - 1 for subject in found for word in subject for p in word]
            grids = text[b][:, positions].T.reshape(len(positions), 1, height, width)
            smoothed = F.conv2d(F.pad(grids, (1, 1, 1, 1), mode="reflect"), self.kernel.to(grids))
            excite.append((1.0 - smoothed.amax(dim=(1, 2, 3))).clamp(min=0).max())
            bind.append(binding(text[b], found))
        return torch.stack(excite), torch.stack(excite) + BIND * torch.stack(bind)


def binding(text: Tensor, found: list[Subject]) -> Tensor:
    """The binding term of one sample's (pixels, tokens) maps, 0..2: each modifier's divergence from
    its noun, and one minus the divergence of each subject's words from every other subject's, both
    averaged. Subjects of one word take no part (Attend-and-Excite alone, as diffusers has it)."""
    maps = []
    for subject in (s for s in found if len(s) > 1):
        words = [text[:, [p - 1 for p in word]].sum(dim=1) for word in subject]
        maps.append([word / word.sum() for word in words])
    close = [divergence(modifier, subject[-1]) for subject in maps for modifier in subject[:-1]]
    apart = [divergence(x, y) for i, one in enumerate(maps) for other in maps[i + 1 :] for x in one for y in other]
    term = text.new_zeros(())
    if close:
        term = term + torch.stack(close).mean()
    if apart:
        term = term + 1.0 - torch.stack(apart).mean()
    return term


def divergence(p: Tensor, q: Tensor) -> Tensor:
    """The Jensen-Shannon divergence of two distributions over the pixels, in bits: 0..1."""
    p, q = p.clamp_min(1e-12), q.clamp_min(1e-12)
    middle = (p + q) / 2
    return ((p * (p / middle).log()).sum() + (q * (q / middle).log()).sum()) / (2 * math.log(2))


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
