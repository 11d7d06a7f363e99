"""Textual inversion's training side: a new word's vectors, and captions encoded with them in place.

The word (`textual_inversion.token`, e.g. `<rose>`) is found in each caption as A1111 finds an
embedding's name: by its run of token ids. Those tokens are replaced by the vectors' places, and
the vectors go in at the text encoder's token-embedding layer (ldm.embeddings.replaced_tokens), so
the gradient of the diffusion loss reaches them and nothing else: the model's weights are frozen.
The vectors start as the token embeddings of `init_word`, spread over them as A1111's
`create_embedding` spreads them (textual_inversion.py at 22ecb78b).
"""

import torch
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.embeddings import replaced_tokens
from ldm.text import clean_text, hidden_states

PLACE = 0  # the id a vector's place holds, as in A1111 (its embedding is replaced anyway)


class WordVectors(nn.Module):
    """The new word's vectors, one (count, width) parameter per text encoder."""

    def __init__(self, encoders: list[tuple[CLIPTokenizer, CLIPTextModel]], init_word: str, count: int):
        super().__init__()
        self.vectors = nn.ParameterList()
        for tokenizer, encoder in encoders:
            ids = tokenizer(clean_text(init_word), add_special_tokens=False).input_ids[:count]
            table = encoder.get_input_embeddings().weight.detach()
            start = table[torch.tensor(ids or [tokenizer.eos_token_id])].float()
            self.vectors.append(nn.Parameter(start[[i * len(start) // count for i in range(count)]].clone()))

    def forward(self) -> list[Tensor]:
        """The vectors (a module call, so several processes keep their gradients in step)."""
        return list(self.vectors)


def token_ids(tokenizer: CLIPTokenizer, token: str) -> list[int]:
    return tokenizer(clean_text(token), add_special_tokens=False).input_ids


def placed(tokenizer: CLIPTokenizer, captions: list[str], token: str, count: int) -> tuple[Tensor, list]:
    """(batch, context) ids of the captions with each use of `token` replaced by `count` places, cut
    to the context; and (caption, position) of each use that fits whole."""
    word, context = token_ids(tokenizer, token), tokenizer.model_max_length
    rows, batch = [], []
    for b, caption in enumerate(captions):
        ids, out, i = tokenizer(clean_text(caption), add_special_tokens=False).input_ids, [], 0
        while i < len(ids):
            if ids[i : i + len(word)] == word:
                if len(out) + count <= context - 2:
                    rows.append((b, 1 + len(out)))
                out += [PLACE] * count
                i += len(word)
            else:
                out.append(ids[i])
                i += 1
        out = [tokenizer.bos_token_id, *out[: context - 2], tokenizer.eos_token_id]
        batch.append(out + [tokenizer.pad_token_id] * (context - len(out)))
    return torch.tensor(batch), rows


def encode_with_word(
    encoders: list[tuple[CLIPTokenizer, CLIPTextModel]],
    captions: list[str],
    penultimate: bool,
    token: str,
    vectors: list[Tensor],
) -> tuple[Tensor, Tensor | None]:
    """As ldm.text.encode_captions, with the word's vectors in its places (each encoder its own)."""
    outputs = []
    for (tokenizer, encoder), word in zip(encoders, vectors, strict=True):
        ids, rows = placed(tokenizer, captions, token, len(word))
        with replaced_tokens(encoder, [(b, position, word) for b, position in rows]):
            outputs.append(hidden_states(encoder, ids.to(word.device), penultimate))
    if not penultimate:
        return outputs[0][0], None
    return torch.cat([text for text, _ in outputs], dim=-1), outputs[-1][1]
