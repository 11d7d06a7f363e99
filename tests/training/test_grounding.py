"""The grounding loss: the right tokens, the right pixels, and 0 only when attention is inside the box."""

import pytest
import torch

from ldm.text import clip_tokenizer
from ldm.train.grounding import grounding_loss, grounding_targets

TOKENIZER = clip_tokenizer(model_max_length=24)


def targets_for(captions, boxes, size=(4, 4)):
    return grounding_targets(TOKENIZER, captions, boxes, size)


def test_a_words_tokens_and_the_pixels_its_boxes_overlap():
    caption = "a small cyan circle in the top left and a cyan square at the bottom"
    boxes = [["cyan", 0.0, 0.0, 0.25, 0.25], ["circle", 0.0, 0.0, 0.25, 0.25], ["cyan", 0.4, 0.75, 0.6, 1.0]]
    targets = targets_for([caption], [boxes])
    ids = TOKENIZER(caption).input_ids
    cyan = TOKENIZER("cyan", add_special_tokens=False).input_ids
    assert len(cyan) == 2  # cy + an: the word is both tokens
    spelled = [ids[i] for i in range(len(ids)) if targets.tokens[0, 0, i]]
    assert spelled == cyan * 2  # both places in the caption
    assert targets.masks[0, 0].tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]]
    assert targets.masks[0, 1].sum() == 1 and targets.present.tolist() == [[True, True]]


def test_dropped_captions_and_items_without_boxes_count_for_nothing():
    targets = targets_for(["", "a red circle"], [[["red", 0, 0, 1, 1]], None])
    assert not targets.present.any()
    layer = torch.rand(2, 2, 16, 24).softmax(-1)
    assert grounding_loss([layer], targets) == 0


def attention_on(pixels: list[int], token: int, size: int = 16) -> torch.Tensor:
    """(1, 1 head, size pixels, 24 tokens): the given pixels attend only to `token`."""
    probs = torch.zeros(1, 1, size, 24)
    probs[..., 0] = 1
    probs[0, 0, pixels, 0] = 0
    probs[0, 0, pixels, token] = 1
    return probs


def test_zero_when_the_words_attention_is_inside_its_box_and_one_when_outside():
    targets = targets_for(["a red circle"], [[["red", 0.0, 0.0, 0.5, 0.5]]])  # the top-left 2x2 of 4x4
    red = int(targets.tokens[0, 0].nonzero()[0])
    inside, outside = [0, 1, 4, 5], [10, 11, 14, 15]
    assert grounding_loss([attention_on(inside, red)], targets) == 0
    assert grounding_loss([attention_on(outside, red)], targets) == 1
    half = grounding_loss([attention_on([0, 1, 10, 11], red)], targets)
    assert half == pytest.approx(0.25)  # (1 - 1/2)²
    # a 2x2 layer: its top-left pixel covers the box
    assert grounding_loss([attention_on([0], red, size=4)], targets) == 0


def test_the_loss_pulls_the_attention_into_the_box():
    targets = targets_for(["a red circle"], [[["red", 0.0, 0.0, 0.5, 0.5]]])
    scores = torch.zeros(1, 2, 16, 24, requires_grad=True)
    grounding_loss([scores.softmax(-1)], targets).backward()
    red = int(targets.tokens[0, 0].nonzero()[0])
    gradient = scores.grad[0, :, :, red].mean(0).view(4, 4)
    assert (gradient[:2, :2] < 0).all() and (gradient[2:, 2:] > 0).all()  # descent raises inside, lowers outside
