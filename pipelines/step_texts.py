"""A batch's conditioning at each sampling step. Without prompt editing it is the same at every step;
with it (pipelines/prompt_editing.py), step i reads each prompt's text of step i, and each distinct
set of texts is encoded once, however many steps read it."""

from collections.abc import Callable
from typing import NamedTuple

from pipelines.conditioning import Conditioning
from pipelines.prompt_editing import prompt_schedule, text_at
from pipelines.prompts import parse_emphasis


class Text(NamedTuple):
    """A batch's conditioning: the prompts', and the negative prompt's (None without guidance)."""

    conditional: Conditioning
    unconditional: Conditioning | None  # its text may have another number of tokens


class StepTexts:
    def __init__(
        self,
        prompts: list[str],
        negative: str | None,
        steps: int,
        encode: Callable[[list[str]], Conditioning],
        encode_negative: Callable[[str], Conditioning],
    ):
        """`negative` None: no guidance, so no unconditional text. `encode` makes the batch's
        conditioning from its texts; `encode_negative` one negative text's, for one image."""
        self.schedules = [prompt_schedule(prompt, steps) for prompt in prompts]
        self.negative = None if negative is None else prompt_schedule(negative, steps)
        self._encode, self._encode_negative = encode, encode_negative
        self._encoded: dict[tuple, Text] = {}
        self.at(0)  # the first step's texts now, before sampling starts: their warnings come first

    def at(self, step: int) -> Text:
        """The conditioning of sampling step `step` (0-based, one per model call, as A1111 counts)."""
        prompts = tuple(text_at(schedule, step) for schedule in self.schedules)
        negative = None if self.negative is None else text_at(self.negative, step)
        if (prompts, negative) not in self._encoded:
            unconditional = None if negative is None else self._encode_negative(negative).repeat(len(prompts))
            self._encoded[prompts, negative] = Text(self._encode(list(prompts)), unconditional)
        return self._encoded[prompts, negative]


def edited(prompt: str, steps: int) -> bool:
    """Whether the prompt's text changes during sampling."""
    return len(prompt_schedule(prompt, steps)) > 1


def check_texts(prompt: str, steps: int, emphasis: str) -> None:
    """Every text the prompt reads during sampling, checked for bad weights before the first image."""
    if emphasis != "none":
        for _, text in prompt_schedule(prompt, steps):
            parse_emphasis(text)
