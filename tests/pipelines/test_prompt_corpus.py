"""A parity corpus generated from the whole of A1111's emphasis grammar, as `re_attention` in
modules/prompt_parser.py (AUTOMATIC1111/stable-diffusion-webui, commit 28bd8e14) reads it: nested
round and square brackets, weights with whitespace (spaces, tabs, newlines) on both sides of the
number, escapes, lone backslashes, colons and stray closers as text, and BREAK at any depth.

Each prompt is built as a tree, so its expected pieces are known by construction, not by running a
second parser: a piece's weight is the product of its brackets' factors from the innermost out (the
order A1111 multiplies in), BREAK is a piece of weight -1 times its brackets, and neighbours of
equal weight merge, as A1111 merges them."""

import itertools
import random

from pipelines.prompts import parse_emphasis

WORDS = ["red", "circle", "a", "big blue", "sky,", "16:9 wide", "time: 3 pm", "café", "x"]  # colons as text
SPACES = ["", " ", "  ", "\t", "\n", " \n\t"]
WEIGHTS = ["1.2", "0.5", ".5", "2", "+1.1", "-0.3", "1.", "0", "1.25"]
ESCAPES = [("\\(", "("), ("\\)", ")"), ("\\[", "["), ("\\]", "]"), ("\\\\", "\\"), ("\\q", "q")]


def _node(rng: random.Random, depth: int, stack: list[float], out: list[tuple[str, float]]) -> str:
    """One element of the prompt; appends its expected (text, weight) pieces to `out` given the
    factors of the brackets it sits in (innermost last)."""

    def weighted(base: float) -> float:
        for factor in reversed(stack):
            base *= factor
        return base

    kind = rng.choice(["word", "word", "escape", "break", "group", "group"] if depth < 3 else ["word", "escape"])
    if kind == "word":
        text = rng.choice(WORDS)  # no whitespace at its ends: next to BREAK, A1111 strips it
        out.append((text, weighted(1.0)))
        return text
    if kind == "escape":
        raw, literal = rng.choice(ESCAPES)
        # a lone backslash is dropped and the letter after it is text
        out += [("", weighted(1.0)), ("q", weighted(1.0))] if raw == "\\q" else [(literal, weighted(1.0))]
        return raw
    if kind == "break":
        out += [("", weighted(1.0)), ("BREAK", weighted(-1.0)), ("", weighted(1.0))]
        return rng.choice(SPACES[1:]) + "BREAK" + rng.choice(SPACES[1:])
    shape = rng.choice(["round", "square", "weight"])
    factor = {"round": 1.1, "square": 1 / 1.1}.get(shape) or float(weight := rng.choice(WEIGHTS))
    inner = [_node(rng, depth + 1, [*stack, factor], out) for _ in range(rng.randint(1, 3))]
    body = "".join(inner)
    if shape == "square":
        return f"[{body}]"
    if shape == "round":
        return f"({body})"
    return f"({body}:{rng.choice(SPACES)}{weight}{rng.choice(SPACES)})"


def _merged(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Neighbours of equal weight joined, as A1111 merges them."""
    runs = itertools.groupby(pieces, key=lambda piece: piece[1])
    return [("".join(text for text, _ in run), weight) for weight, run in runs] or [("", 1.0)]


def corpus(count: int, seed: int = 0) -> list[tuple[str, list[tuple[str, float]]]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        pieces: list[tuple[str, float]] = []
        prompt = "".join(_node(rng, 0, [], pieces) for _ in range(rng.randint(1, 5)))
        cases.append((prompt, _merged(pieces)))
    return cases


def test_the_corpus_holds_whitespace_around_weights():
    prompts = [prompt for prompt, _ in corpus(5000)]
    assert sum(": " in p or " )" in p or ":\t" in p or ":\n" in p for p in prompts) > 500


def test_5000_generated_prompts_parse_to_a1111s_pieces_and_weights():
    differ = [(prompt, expected) for prompt, expected in corpus(5000) if parse_emphasis(prompt) != expected]
    assert not differ, f"{len(differ)} differ, e.g. {differ[0]!r} -> {parse_emphasis(differ[0][0])!r}"
