"""A1111's extra-network tags: `<lora:name:0.8>` in a prompt merges the LoRA file `name` at scale 0.8
and leaves the prompt without the tag. Read as A1111's modules/extra_networks.py does (`parse_prompt`,
commit 013e4223): a tag is `<kind:arg:arg...>`, the args split at colons, and the tag is removed
from the text; a LoRA's scale is its second arg, 1 when absent. Its third (A1111's separate UNet
scale) must equal the second: our LoRAs merge one scale into both."""

import re

from ldm.errors import UserError

TAG = re.compile(r"<(\w+):([^>]+)>")


class ExtraNetworkError(UserError):
    """A tag we cannot apply; one line."""


def lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its tags, and each `<lora:...>` tag's (name, scale), in order."""
    loras = []

    def take(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2).split(":")
        if kind != "lora":
            raise ExtraNetworkError(f"{match.group(0)}: only <lora:NAME:SCALE> tags are supported here")
        try:
            scales = [float(arg) for arg in args[1:]] or [1.0]
        except ValueError:
            raise ExtraNetworkError(f"{match.group(0)}: the scale must be a number, as <lora:NAME:0.8>") from None
        if len(set(scales)) > 1:
            raise ExtraNetworkError(f"{match.group(0)}: one scale for the text encoder and the UNet here")
        loras.append((args[0], scales[0]))
        return ""

    return TAG.sub(take, prompt), loras
