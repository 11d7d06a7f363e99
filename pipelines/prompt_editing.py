"""Prompt editing and alternation, as AUTOMATIC1111 schedules them: the prompt's text changes during
sampling, and each step is conditioned on the text of that step.

    [from:to:when]   `from` until step `when`, then `to`    ("a [cat:dog:10]", "[cat:dog:0.4]")
    [to:when]        nothing, then `to` after `when`
    [from::when]     `from`, then nothing after `when`
    [a|b|c]          a, b, c, a, ... one per step            ("a [cat|dog]", "[fe|]male")

`when` without a decimal point is a step number, with one a fraction of the steps (0.4 of 25 is 10;
1.0 is the end); the forms nest, and hold emphasis inside ("[(cat:1.2):dog:5]").

Read as modules/prompt_parser.py does (commit 28bd8e14): its grammar (`schedule_parser`) and
`get_learned_conditioning_prompt_schedules` without hires steps. A bracket that fits none of the
forms is text (then emphasis, `[word]`, or literally `[`); a prompt the grammar cannot read at all (a
`|` outside alternation, a trailing backslash) is used unchanged at every step. A1111 looks the text up
for sampling step i (counted from 0, one per model call) as the first entry that ends at or after i;
`text_at` does the same.
"""

import re
from dataclasses import dataclass

Node = "str | Scheduled | Alternate"
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)  # text: no brackets, colons or bars; \x escapes
_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")


@dataclass(frozen=True)
class Scheduled:
    before: list | None  # None: `[to:when]`
    after: list
    when: str  # the number as written: a point makes it a fraction of the steps


@dataclass(frozen=True)
class Alternate:
    options: list[list]


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, text), ...]: each text and the step (1-based, as A1111 counts) it lasts until."""
    nodes = _parse_start(prompt)
    if nodes is None:
        return [(steps, prompt)]
    ends = {steps} | set(_ends(nodes, steps))
    return [(end, _render(nodes, end, steps)) for end in sorted(ends)]


def text_at(schedule: list[tuple[int, str]], step: int) -> str:
    """The text for sampling step `step` (0-based): the first entry ending at or after it."""
    return next((text for end, text in schedule if step <= end), schedule[-1][1])


def _when(number: str, steps: int) -> int:
    """A1111's: a number with a point is a fraction of the steps, one without a step; at most `steps`."""
    value = float(number) * steps if "." in number else float(number)
    return int(max(-1.0, min(float(steps), value)))  # clamped first: "1e999" is a number too


def _ends(nodes: list, steps: int):
    for node in nodes:
        if isinstance(node, Scheduled):
            if _when(node.when, steps) >= 1:
                yield _when(node.when, steps)
            yield from _ends((node.before or []) + node.after, steps)
        elif isinstance(node, Alternate):
            yield from range(1, steps + 1)
            for option in node.options:
                yield from _ends(option, steps)


def _render(nodes: list, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Scheduled):
            chosen = (node.before or []) if step <= _when(node.when, steps) else node.after
            out.append(_render(chosen, step, steps))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(out)


def _parse_start(text: str) -> list | None:
    """The grammar's `start`: prompts, and between them brackets and colons that are text. None where
    something else is left (a `|`, a lone trailing backslash): A1111's parser fails on those."""
    nodes, i = [], 0
    while i < len(text):
        parsed, i = _parse_prompt(text, i)
        nodes += parsed
        if i < len(text):
            if text[i] not in "[]():":
                return None
            nodes.append(text[i])
            i += 1
    return nodes


def _parse_prompt(text: str, i: int) -> tuple[list, int]:
    """The grammar's `prompt`: text, whitespace and bracket forms, as far as they go."""
    nodes = []
    while i < len(text):
        if text[i] in "([":
            parsed = _parse_bracket(text, i)
            if parsed is None:
                break
            node, i = parsed
            nodes += node
        elif match := _PLAIN.match(text, i):
            nodes.append(match.group(0))
            i = match.end()
        else:
            break
    return nodes, i


def _parse_bracket(text: str, i: int) -> tuple[list, int] | None:
    """One of the forms that open at text[i]: for `(`, emphasis `(p)` or `(p:p)`; for `[`,
    scheduling, alternation, or emphasis `[p]`, whichever fits. Emphasis stays text, brackets and all."""
    first, j = _parse_prompt(text, i + 1)
    if text[i] == "(":
        if j < len(text) and text[j] == ")":
            return ["(", *first, ")"], j + 1
        if j < len(text) and text[j] == ":":
            second, k = _parse_prompt(text, j + 1)
            if k < len(text) and text[k] == ")":
                return ["(", *first, ":", *second, ")"], k + 1
        return None
    if j < len(text) and text[j] == "]":
        return ["[", *first, "]"], j + 1
    if j < len(text) and text[j] == "|":
        return _parse_alternate(text, [first], j)
    if j < len(text) and text[j] == ":":
        return _parse_scheduled(text, first, j)
    return None


def _parse_alternate(text: str, options: list[list], j: int) -> tuple[list, int] | None:
    while j < len(text) and text[j] == "|":
        option, j = _parse_prompt(text, j + 1)
        options.append(option)
    if j < len(text) and text[j] == "]":
        return [Alternate(options)], j + 1
    return None


def _parse_scheduled(text: str, first: list, j: int) -> tuple[list, int] | None:
    """After `[first:`: either `when]` (first is the `to`), or `to:when]`."""
    if number := _NUMBER.match(text, j + 1):
        return [Scheduled(None, first, number.group(1))], number.end()
    second, k = _parse_prompt(text, j + 1)
    if k < len(text) and text[k] == ":" and (number := _NUMBER.match(text, k + 1)):
        return [Scheduled(first, second, number.group(1))], number.end()
    return None
