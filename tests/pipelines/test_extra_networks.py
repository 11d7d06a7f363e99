"""A1111's extra-network tags, read as modules/extra_networks.py's `parse_prompt` (commit 013e4223)
reads them: `<kind:arg:arg>` anywhere, args split at colons, the tag removed from the text."""

import pytest

from pipelines.extra_networks import ExtraNetworkError, lora_tags


def test_lora_tags_are_taken_out_with_their_scales():
    assert lora_tags("a cat <lora:style:0.8>, <lora:detail> oil") == ("a cat ,  oil", [("style", 0.8), ("detail", 1.0)])
    assert lora_tags("no tags (here:1.2)") == ("no tags (here:1.2)", [])
    assert lora_tags("<lora:style:0.5:0.5>") == ("", [("style", 0.5)])


@pytest.mark.parametrize(
    "prompt, message",
    [("<hypernet:x:1>", "only <lora:NAME:SCALE> tags"), ("<lora:x:strong>", "the scale must be a number"),
     ("<lora:x:0.5:1>", "one scale for the text encoder and the UNet")],
)  # fmt: skip
def test_tags_we_cannot_apply_are_one_line(prompt, message):
    with pytest.raises(ExtraNetworkError, match=message):
        lora_tags(prompt)
