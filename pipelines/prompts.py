"""Prompts as web-UI users write them: emphasis brackets and prompts longer than CLIP's 77 tokens.

Emphasis: `(word)` multiplies the word's weight by 1.1, `[word]` divides it by 1.1, `(word:1.3)` sets
1.3; brackets nest and multiply; `\\(` is a literal bracket. A weight scales the word's token
embeddings, then the whole prompt's embedding is rescaled to its original mean (as A1111 does).

Length: the tokens are cut into chunks of the tokenizer's context less two (75 for CLIP's 77),
each encoded on its own between start and end tokens, and the chunks' embeddings are
concatenated; cross-attention takes any number of keys.
"""

import re
import warnings

import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

ROUND, SQUARE = 1.1, 1 / 1.1
_TOKENS = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:|\\")


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """'a (red:1.5) [circle]' -> [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('circle', 0.909...)]."""
    pieces: list[list] = []  # [text, weight]
    open_round: list[int] = []  # where each open bracket's span starts in `pieces`
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKENS.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if text.startswith("\\") and len(text) == 2:
            pieces.append([text[1], 1.0])  # an escaped bracket or backslash is plain text
        elif text == "(":
            open_round.append(len(pieces))
        elif text == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), float(weight))
        elif text == ")" and open_round:
            scale_from(open_round.pop(), ROUND)
        elif text == "]" and open_square:
            scale_from(open_square.pop(), SQUARE)
        else:
            pieces.append([text, 1.0])
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


def chunk_size(tokenizer: CLIPTokenizer) -> int:
    """Prompt tokens per chunk: the context less the start and end tokens."""
    return tokenizer.model_max_length - 2


def tokenize_weighted(tokenizer: CLIPTokenizer, prompt: str) -> tuple[list[int], list[float]]:
    """Token ids (no start/end tokens) and one weight per token."""
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in parse_emphasis(prompt):
        piece = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    return ids, weights


def encode_weighted(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str], truncate: bool = False
) -> Tensor:
    """(batch,) prompts -> (batch, context * chunks, width) token embeddings, emphasis applied.
    All prompts get the same number of chunks (short ones padded with empty chunks), so that
    a prompt and its negative can share a batch. With `truncate`, one chunk, and a warning
    names what was cut."""
    tokenized = [tokenize_weighted(tokenizer, prompt) for prompt in prompts]
    chunk = chunk_size(tokenizer)
    if truncate:
        for ids, _ in tokenized:
            if len(ids) > chunk:
                warnings.warn(f"prompt cut to {chunk} tokens; dropped: {tokenizer.decode(ids[chunk:])!r}", stacklevel=2)
        tokenized = [(ids[:chunk], weights[:chunk]) for ids, weights in tokenized]
    chunks = max(1, *((len(ids) + chunk - 1) // chunk for ids, _ in tokenized))

    start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    all_ids, all_weights = [], []
    for ids, weights in tokenized:
        for c in range(chunks):
            piece, piece_weights = ids[c * chunk : (c + 1) * chunk], weights[c * chunk : (c + 1) * chunk]
            padding = chunk - len(piece)
            all_ids.append([start, *piece, end] + [pad] * padding)
            all_weights.append([1.0, *piece_weights, 1.0] + [1.0] * padding)

    device = text_encoder.device
    ids = torch.tensor(all_ids, device=device)  # (batch * chunks, context)
    embeddings = text_encoder(ids).last_hidden_state  # (batch * chunks, context, width)
    batch, width = len(prompts), embeddings.shape[-1]
    embeddings = embeddings.reshape(batch, chunks * (chunk + 2), width)
    weights = torch.tensor(all_weights, device=device, dtype=embeddings.dtype).reshape(batch, -1, 1)
    if (weights == 1).all():
        return embeddings  # no emphasis: exactly the plain embedding
    original_mean = embeddings.mean(dim=(1, 2), keepdim=True)
    embeddings = embeddings * weights
    return embeddings * (original_mean / embeddings.mean(dim=(1, 2), keepdim=True))
