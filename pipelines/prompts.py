"""Prompts as web-UI users write them: emphasis brackets, BREAK, and prompts longer than CLIP's context.

Syntax, as AUTOMATIC1111's `parse_prompt_attention` reads it (modules/prompt_parser.py at commit
28bd8e14): `(word)` multiplies the word's weight by 1.1, `[word]` divides it by 1.1, `(word:1.3)`
sets 1.3, whitespace allowed on both sides of the number (`(word: 1.3 )`); brackets nest and
multiply; `\\(` is a literal bracket; `BREAK` ends a chunk. One deviation: a weight A1111 would
read as text because its number is not plain decimal (`(red:nan)`, `(red:1e3)`) is refused here,
as is a weight too large to be finite: both are mistakes, and A1111 draws them silently.

Chunks, as A1111's `tokenize_line` makes them (modules/sd_hijack_clip.py at commit 00e09382): a
prompt is cut into chunks of the context less two tokens (75 for CLIP's 77), each encoded on its own
between start and end tokens, and their embeddings concatenated; cross-attention takes any number of
keys. A chunk that would split the text within 20 tokens after a comma ends at that comma instead.

Emphasis modes (how a weight changes a token's embedding), per chunk:
- `original`: A1111's default: scale each token's embedding by its weight, then rescale the chunk to
  its old mean. Where that mean is about zero (a text encoder whose final LayerNorm has no bias, as
  small models trained from scratch), restoring it divides noise by noise, so it is skipped there.
- `no-norm`: A1111's "No norm": scale by the weight only.
- `comfy`: ComfyUI's: move each weighted token away from (or toward) the empty prompt's embedding at
  its position, `empty + weight * (token - empty)` (comfy/sd1_clip.py, `encode_token_weights`,
  at commit b55c2247).
- `none`: A1111's "None": brackets are plain text.

SDXL: each of the two encoders reads the prompt so (the same chunks; the second pads with "!"), its
penultimate hidden states are weighted, and the two are put side by side (768 + 1280 wide), as
A1111's and ComfyUI's SDXL conditioners do; the pooled embedding is the second encoder's, of the
first chunk, unweighted (A1111: modules/sd_hijack_clip.py keeps the first chunk's `pooled`).
"""

import math
import re
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.embeddings import Embedding, replaced_tokens
from ldm.errors import UserError
from ldm.text import clean_text, hidden_states
from pipelines.choices import EMPHASIS_MODES
from pipelines.embeddings import EmbeddingFolder

ROUND, SQUARE = 1.1, 1 / 1.1
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`
MEAN_FLOOR = 0.01  # a chunk mean under 1% of the mean |value| is taken as zero (`original` mode)
BREAK = ("BREAK", -1.0)  # as A1111's parser marks it

_TOKENS = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
_NOT_DECIMAL = re.compile(r":\s*[+-]?(nan|inf(inity)?|[.\d]*\d[.\d]*e[+-]?\d+)\s*\)", re.I)  # float() would take it
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


class PromptError(UserError):
    """A prompt that cannot be read (a malformed weight); one line."""


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """'a (red:1.5) [circle]' -> [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('circle', 0.909...)];
    BREAK -> ('BREAK', -1). The same pieces and weights as A1111's parser."""
    not_decimal = _NOT_DECIMAL.search(prompt)
    if not_decimal:
        raise PromptError(f"{not_decimal.group(0)!r}: a weight is a plain decimal number, as in (word:1.2)")
    pieces: list[list] = []  # [text, weight]
    open_round: list[int] = []  # where each open bracket's span starts in `pieces`
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKENS.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if text.startswith("\\"):
            pieces.append([text[1:], 1.0])  # an escaped character is text; a lone backslash is dropped
        elif text == "(":
            open_round.append(len(pieces))
        elif text == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), _weight(weight))
        elif text == ")" and open_round:
            scale_from(open_round.pop(), ROUND)
        elif text == "]" and open_square:
            scale_from(open_square.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(text)):
                pieces += [list(BREAK)] if i else []
                pieces.append([part, 1.0])
    for start in open_round:  # unclosed brackets reach to the end
        scale_from(start, ROUND)
    for start in open_square:
        scale_from(start, SQUARE)

    merged: list[tuple[str, float]] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def _weight(text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise PromptError(f"({text!r} is not a number: write a weight as (word:1.2)") from None
    if not math.isfinite(weight):
        raise PromptError(f"weight {text[:20]}...: too large to be a number; write a weight as (word:1.2)")
    return weight


def chunk_size(tokenizer: CLIPTokenizer) -> int:
    """Prompt tokens per chunk: the context less the start and end tokens."""
    return tokenizer.model_max_length - 2


@dataclass(frozen=True)
class Chunks:
    """A prompt as the text encoder reads it: chunks of ids (start and end tokens included, padded
    to the context) with a weight per id, and where each of the prompt's own tokens went. An
    embedding's places hold id 0 (A1111's placeholder); `fixes` say where its vectors go."""

    ids: list[list[int]]
    weights: list[list[float]]
    positions: list[int]  # prompt token i sits at positions[i] in the concatenated chunks
    tokens: list[str]  # prompt token i's text (an embedding's name for each of its places)
    fixes: list[tuple[int, int, Embedding]] = ()  # (chunk, position in it, embedding) for each use


class Unit(NamedTuple):
    """One place in a chunk: a token id, or place `part` of an embedding's vectors (id 0)."""

    id: int
    weight: float
    embedding: Embedding | None = None
    part: int = 0


def split_into_chunks(
    tokenizer: CLIPTokenizer,
    prompt: str,
    emphasis: str = "original",
    embeddings: EmbeddingFolder | None = None,
    widths: list[int] = (),
) -> Chunks:
    """Parse, clean and tokenize the prompt; put in the embeddings it names (`widths`: the model's
    text encoders', to check that they fit); cut it into chunks as A1111 does (BREAK, comma
    backtrack, an embedding never split)."""
    parsed = [(prompt, 1.0)] if emphasis == "none" else parse_emphasis(prompt)
    pieces = [
        None if (text, weight) == BREAK else _units(tokenizer, clean_text(text), weight, embeddings, list(widths))
        for text, weight in parsed
    ]
    size = chunk_size(tokenizer)
    chunks = _cut(pieces, size, comma=tokenizer.convert_tokens_to_ids(",</w>"))
    start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = [[start, *(u.id for u in chunk), end] + [pad] * (size - len(chunk)) for chunk in chunks]
    weights = [[1.0, *(u.weight for u in chunk), 1.0] + [1.0] * (size - len(chunk)) for chunk in chunks]
    positions = [c * (size + 2) + 1 + j for c, chunk in enumerate(chunks) for j in range(len(chunk))]
    texts = tokenizer.convert_ids_to_tokens([u.id for chunk in chunks for u in chunk])
    units = [u for chunk in chunks for u in chunk]
    tokens = [u.embedding.name if u.embedding else t.replace("</w>", "") for u, t in zip(units, texts, strict=True)]
    fixes = [
        (c, 1 + j, u.embedding)
        for c, chunk in enumerate(chunks)
        for j, u in enumerate(chunk)
        if u.embedding and not u.part
    ]
    return Chunks(ids, weights, positions, tokens, fixes)


def _units(
    tokenizer: CLIPTokenizer, text: str, weight: float, embeddings: EmbeddingFolder | None, widths: list[int]
) -> list[Unit]:
    """One weighted piece's places: its tokens, with each embedding name replaced by the
    embedding's places (A1111 looks for names within a piece, not across pieces)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if embeddings is None:
        return [Unit(token, weight) for token in ids]
    units, position = [], 0
    while position < len(ids):
        found = embeddings.find(tokenizer, ids, position, widths)
        if found is None:
            units.append(Unit(ids[position], weight))
            position += 1
            continue
        embedding, length = found
        if embedding.count > chunk_size(tokenizer):
            raise PromptError(f"embedding {embedding.name!r} has {embedding.count} vectors: more than a chunk holds")
        units += [Unit(0, weight, embedding, part) for part in range(embedding.count)]
        position += length
    return units


def _cut(pieces: list[list[Unit] | None], size: int, comma: int) -> list[list[Unit]]:
    """Pieces of places, None for BREAK -> chunks of at most `size` places. An embedding that would
    not fit in what is left of a chunk starts the next one. Where the comma backtrack moves the
    text after a comma to the next chunk, an embedding in that text moves with its vectors
    (A1111 leaves its vectors behind, over the end tokens: not followed)."""
    chunks: list[list[Unit]] = []
    current: list[Unit] = []
    last_comma = -1
    for piece in pieces:
        if piece is None:  # BREAK
            chunks, current, last_comma = [*chunks, current], [], -1
            continue
        for unit in piece:
            if unit.part:  # the rest of an embedding: placed with its first
                current.append(unit)
                continue
            if unit.id == comma and unit.embedding is None:
                last_comma = len(current)
            elif len(current) == size and last_comma != -1 and len(current) - last_comma <= COMMA_BACKTRACK:
                chunks.append(current[: last_comma + 1])  # end at the comma; carry the rest over
                current, last_comma = current[last_comma + 1 :], -1
            if len(current) == size or (unit.embedding and len(current) + unit.embedding.count > size):
                chunks, current, last_comma = [*chunks, current], [], -1
            current.append(unit)
    if current or not chunks:
        chunks.append(current)
    return chunks


class Encoded(NamedTuple):
    """A prompt's conditioning from the text encoder(s)."""

    text: Tensor  # (1, context * chunks, width): the token embeddings, the encoders' side by side
    pooled: Tensor | None  # (1, width): SDXL's pooled text (second encoder, first chunk); else None


def encode_weighted(
    encoders: list[tuple[CLIPTokenizer, CLIPTextModel]],
    prompt: str,
    emphasis: str = "original",
    truncate: bool = False,
    prompt_2: str | None = None,
    penultimate: bool = False,
    embeddings: EmbeddingFolder | None = None,
) -> Encoded:
    """A prompt -> its token embeddings, emphasis applied, by each (tokenizer, encoder) pair: one,
    or SDXL's two, which read the layer before the last (`penultimate`; the SDXL refiner's one
    encoder too). SDXL's second encoder reads `prompt_2` where one is given (diffusers' name). When
    the two prompts make different numbers of chunks, the shorter side is padded with its empty
    prompt's chunk, as ComfyUI's CLIPTextEncodeSDXL does (comfy_extras/nodes_clip_sdxl.py). With
    `truncate`, the first chunk only, and a warning names what was cut. Names of `embeddings` in
    the prompt are replaced by their vectors (each encoder its own, SDXL's clip_l and clip_g)."""
    if emphasis not in EMPHASIS_MODES:
        raise PromptError(f"emphasis={emphasis!r}: use one of {', '.join(EMPHASIS_MODES)}")
    prompts = [prompt, prompt if prompt_2 is None else prompt_2]
    texts, pooled = [], None
    widths = encoder_widths(encoders)
    for k, (tokenizer, text_encoder) in enumerate(encoders):
        chunks = split_into_chunks(tokenizer, prompts[k], emphasis, embeddings, widths)
        ids, weights = chunks.ids, chunks.weights
        if truncate and len(ids) > 1:
            if k == 0 or prompts[1] != prompts[0]:
                dropped = [t for chunk in ids[1:] for t in chunk if t not in tokenizer.all_special_ids]
                warnings.warn(f"prompt cut to one chunk; dropped: {tokenizer.decode(dropped)!r}", stacklevel=2)
            ids, weights = ids[:1], weights[:1]
        rows = [(c, j, e.for_encoder(k, len(encoders), widths[k])) for c, j, e in chunks.fixes if c < len(ids)]
        tokens, pooled = _weighted(tokenizer, text_encoder, ids, weights, emphasis, penultimate, rows)
        texts.append(tokens.reshape(1, -1, tokens.shape[-1]))
    longest = max(text.shape[1] for text in texts)
    for k, (tokenizer, text_encoder) in enumerate(encoders):
        if texts[k].shape[1] < longest:
            empty = split_into_chunks(tokenizer, "")
            chunk = _weighted(tokenizer, text_encoder, empty.ids, empty.weights, "none", penultimate)[0]
            texts[k] = pad_with_chunk(texts[k], chunk, longest)
    return Encoded(torch.cat(texts, dim=-1), None if pooled is None else pooled[:1])


def encoder_widths(encoders: list[tuple[CLIPTokenizer, CLIPTextModel]]) -> list[int]:
    """Each text encoder's token-embedding width: what an embedding's vectors must match."""
    return [encoder.get_input_embeddings().embedding_dim for _, encoder in encoders]


def pad_with_chunk(text: Tensor, chunk: Tensor, tokens: int) -> Tensor:
    """(1, n, width) embeddings made `tokens` long by appending copies of one (1, context, width) chunk."""
    return torch.cat([text, *[chunk] * ((tokens - text.shape[1]) // chunk.shape[1])], dim=1)


def _weighted(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    ids: list[list[int]],
    weights: list[list[float]],
    emphasis: str,
    penultimate: bool,
    rows: list[tuple[int, int, Tensor]] = (),
) -> tuple[Tensor, Tensor | None]:
    """One encoder's (chunks, context, width) embeddings of the chunks, weighted; and its pooled, per
    chunk. `rows`: embedding vectors that replace token embeddings, (chunk, position, vectors)."""
    device = text_encoder.device
    with replaced_tokens(text_encoder, list(rows)):
        embeddings, pooled = hidden_states(text_encoder, torch.tensor(ids, device=device), penultimate)
    weights = torch.tensor(weights, device=device, dtype=embeddings.dtype)[..., None]  # (chunks, context, 1)
    if emphasis != "none" and (weights != 1).any():
        if emphasis == "comfy":
            empty_ids = torch.tensor(split_into_chunks(tokenizer, "").ids, device=device)
            empty = hidden_states(text_encoder, empty_ids, penultimate)[0]
            embeddings = empty + (embeddings - empty) * weights
        else:
            embeddings = _scale(embeddings, weights, restore_mean=emphasis == "original")
    return embeddings, pooled


def _scale(chunks: Tensor, weights: Tensor, restore_mean: bool) -> Tensor:
    """A1111's emphasis: weight each token, then (`restore_mean`) rescale each chunk to its old mean,
    unless the old or new mean is about zero, where their ratio would be noise."""
    weighted = chunks * weights
    if not restore_mean:
        return weighted
    before, after = chunks.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
    floor = MEAN_FLOOR * chunks.abs().mean(dim=(1, 2), keepdim=True)
    sound = (before.abs() >= floor) & (after.abs() >= floor) & (before * after > 0)
    return weighted * torch.where(sound, before / after, torch.ones_like(before))
