"""Captions as kohya's sd-scripts users write them: comma-separated tags, the first `keep_tokens`
of them (the trigger word, the class) fixed in place and the rest shuffled each time they are
read, so the model does not learn their order (sd-scripts library/train_util.py, shuffle_caption)."""

import torch


def shuffle_tags(caption: str, keep_tokens: int = 0) -> str:
    """The caption's tags after the first `keep_tokens`, in a random order drawn from torch's RNG
    (checkpointed, so a resumed run shuffles as the uninterrupted one did)."""
    tags = [tag.strip() for tag in caption.split(",")]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    order = torch.randperm(len(rest)).tolist()
    return ", ".join(kept + [rest[i] for i in order])
