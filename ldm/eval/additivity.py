"""Does an autoencoder's latent space add colour and shape? A probe of the shapes demo's VAE.

    python -m commands.eval_additivity --model runs/shapes-autoencoder/model

The diffusion stage must draw colour-shape pairs it never saw (the left-out pairs). That is easy
when the latent of any pair is about mean + colour part + shape part and the decoder turns such a
sum into the right picture. For each cell (position x size) the renders of every colour x shape
pair are encoded (posterior means); each seen pair's latent is predicted by that two-way additive
fit on the other seen pairs, each left-out pair's on all seen pairs; the predictions are decoded
and read by the detector, which counts those with the right colour and shape.
"""

import itertools

import numpy as np
import torch
from diffusers import AutoencoderKL
from torch import Tensor

from ldm.autoencoder import images_to_latents, latents_to_images
from ldm.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, Shape, draw
from ldm.eval.detector import detect


def additive_fit(latents: Tensor, known: Tensor) -> Tensor:
    """latents (colours, shapes, features) fitted by least squares as mean + a[colour] + b[shape]
    on the `known` (colours, shapes) cells; the fit of every cell."""
    colours, shapes, _ = latents.shape
    rows = torch.cat([torch.ones(colours * shapes, 1),
                      torch.eye(colours).repeat_interleave(shapes, 0),
                      torch.eye(shapes).repeat(colours, 1)], 1).to(latents)  # fmt: skip
    flat = latents.reshape(colours * shapes, -1)
    coefficients = torch.linalg.pinv(rows[known.flatten()]) @ flat[known.flatten()]
    return (rows @ coefficients).reshape(latents.shape)


@torch.no_grad()
def probe(vae: AutoencoderKL, left_out: set[tuple[str, str]], side: int = 64) -> dict[str, dict[str, int]]:
    """How many additive predictions decode to the right colour and shape, seen and left-out pairs."""
    colors, shapes = list(COLORS), list(SHAPES)
    pairs = list(itertools.product(range(len(colors)), range(len(shapes))))
    seen = torch.tensor([[(c, s) not in left_out for s in shapes] for c in colors])
    counts = {"seen": {"right": 0, "of": 0}, "left-out": {"right": 0, "of": 0}}
    for cell, (position, size) in enumerate(itertools.product(POSITIONS, SIZES)):
        # One jitter per cell (a fresh generator per render), so the pairs in a cell line up.
        renders = [draw([Shape(colors[c], shapes[s], position, size)], side, np.random.default_rng(cell))[0]
                   for c, s in pairs]  # fmt: skip
        pixels = torch.from_numpy(np.stack([np.asarray(image) for image in renders])).permute(0, 3, 1, 2)
        means = images_to_latents(vae, pixels.float() / 127.5 - 1, mean=True)
        latents = means.reshape(len(colors), len(shapes), -1)
        for c, s in pairs:
            known = seen.clone()
            known[c, s] = False
            prediction = additive_fit(latents, known)[c, s].reshape(means.shape[1:])
            image = latents_to_images(vae, prediction[None])[0]
            found = detect(((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
            right = len(found) == 1 and (found[0].color, found[0].shape) == (colors[c], shapes[s])
            count = counts["seen" if seen[c, s] else "left-out"]
            count["right"] += right
            count["of"] += 1
    return counts
