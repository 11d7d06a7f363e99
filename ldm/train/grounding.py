"""The grounding loss: a caption word's cross-attention should fall on the thing it names.

TokenCompose's token loss (Wang et al., 2024, "TokenCompose: Text-to-Image Diffusion with
Token-level Supervision"), with boxes for its segmentation masks. In every cross-attention layer,
for each word that has a box, take the attention the image gave the word (its tokens' summed
probabilities, averaged over heads), and push the share of it inside the box to 1:

    L = mean over layers and words of (1 - Σ_inside A / Σ_all A)²
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPTokenizer

from ldm.attention import layer_size
from ldm.text import clean_text


@dataclass
class GroundingTargets:
    """For a batch of B captions with up to W grounded words each, over T tokens."""

    tokens: Tensor  # (B, W, T): 1 where token t spells word w
    masks: Tensor  # (B, W, h, w) at latent size: 1 where a pixel overlaps one of the word's boxes
    present: Tensor  # (B, W) bool: the word has a box and is in the (not dropped) caption


def grounding_targets(
    tokenizer: CLIPTokenizer, captions: list[str], boxes: list[list | None], latent_size: tuple[int, int]
) -> GroundingTargets:
    """`boxes[b]`: [word, x0, y0, x1, y1] rows (fractions of the image) for caption b, or None.
    A word named by several rows is masked by all its boxes; all its places in the caption count."""
    cleaned = [clean_text(caption) for caption in captions]  # as encode_prompts reads them
    ids = tokenizer(cleaned, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    grouped = [{} for _ in captions]
    for item, rows in zip(grouped, boxes, strict=True):
        for word, *box in rows or []:
            item.setdefault(word, []).append(box)
    words = max(1, max(len(item) for item in grouped))
    height, width = latent_size
    tokens = torch.zeros(len(captions), words, tokenizer.model_max_length)
    masks = torch.zeros(len(captions), words, height, width)
    ys, xs = torch.arange(height)[:, None], torch.arange(width)[None, :]
    spellings = {word: tokenizer(word, add_special_tokens=False).input_ids for item in grouped for word in item}
    for b, item in enumerate(grouped):
        for w, (word, word_boxes) in enumerate(item.items()):
            spelled = spellings[word]
            for start in range(len(ids[b]) - len(spelled) + 1):
                if spelled and ids[b][start : start + len(spelled)] == spelled:
                    tokens[b, w, start : start + len(spelled)] = 1
            for x0, y0, x1, y1 in word_boxes:  # pixel [j/width, (j+1)/width) overlaps [x0, x1]
                inside = (xs < x1 * width) & (xs + 1 > x0 * width) & (ys < y1 * height) & (ys + 1 > y0 * height)
                masks[b, w] = torch.maximum(masks[b, w], inside.float())
    return GroundingTargets(tokens, masks, tokens.sum(-1) > 0)


def grounding_loss(layers: list[Tensor], targets: GroundingTargets) -> Tensor:
    """`layers`: each cross-attention layer's (B, heads, pixels, T) probabilities."""
    present = targets.present.to(layers[0].device)
    if not present.any():
        return layers[0].new_zeros(())
    losses = []
    for probs in layers:
        height, width = layer_size(tuple(targets.masks.shape[-2:]), probs.shape[2])
        # A coarser pixel is inside when any latent pixel under it is.
        masks = F.adaptive_max_pool2d(targets.masks, (height, width)).flatten(2).to(probs.device)  # (B, W, pixels)
        word_attention = probs.float().mean(dim=1) @ targets.tokens.to(probs.device).transpose(1, 2)  # (B, pixels, W)
        inside = (word_attention * masks.transpose(1, 2)).sum(dim=1)
        share = inside / word_attention.sum(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        losses.append(((1 - share) ** 2)[present].mean())
    return torch.stack(losses).mean()
