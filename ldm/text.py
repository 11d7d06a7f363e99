"""Prompts -> token embeddings, the keys and values of the UNet's cross-attention.

The tokenizer is the real 49,408-token CLIP BPE. It is derived offline from OpenAI's merges
file (`tokenizer_data/bpe_simple_vocab_16e6.txt.gz`, MIT-licensed, as shipped by CLIP and
open_clip): 256 byte symbols, the same with the end-of-word mark, one token per merge, then
the start and end tokens, exactly as CLIP's `simple_tokenizer.py` builds its vocabulary.
"""

import gzip
import html
import json
import re
from pathlib import Path

import ftfy
import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

BPE_FILE = Path(__file__).parent / "tokenizer_data" / "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77  # CLIP's text context: start token, 75 tokens, end token
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file
TEXT_PREFIX = "text_model."


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + n for n in range(len(others))]
    return dict(zip(printable + others, map(chr, chars), strict=True))


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = CONTEXT_LENGTH) -> CLIPTokenizer:
    """The CLIP tokenizer, built without network. SD 1.x pads with <|endoftext|>, SD 2.x with "!".
    A shorter context (model_max_length) suits a small model trained on short captions."""
    lines = gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    tokens = (
        symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    )
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=merges,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


def save_tokenizer(tokenizer: CLIPTokenizer, directory: Path) -> None:
    """Save in both tokenizer formats: tokenizer.json for transformers 5, and vocab.json +
    merges.txt, which the slow CLIPTokenizer of transformers 4 (what many diffusers installs use) reads."""
    tokenizer.save_pretrained(directory)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def text_state_for_files(text_encoder: CLIPTextModel) -> dict[str, Tensor]:
    """The encoder's weights under the names SD checkpoints and transformers 4 use ("text_model.*").
    transformers 5 drops that prefix in memory, and reads both spellings."""
    return {
        key if key.startswith(TEXT_PREFIX) else TEXT_PREFIX + key: value
        for key, value in text_encoder.state_dict().items()
    }


def text_state_from_files(text_encoder: CLIPTextModel, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint names -> this transformers version's names: the inverse of `text_state_for_files`."""
    if any(key.startswith(TEXT_PREFIX) for key in text_encoder.state_dict()):
        return state
    return {key.removeprefix(TEXT_PREFIX): value for key, value in state.items()}


def clean_text(text: str) -> str:
    """What CLIP's own tokenizer does before BPE: fix mojibake and typography with ftfy, undo HTML
    escapes (twice, as CLIP does), collapse whitespace, lower-case. `it’s` -> `it's`."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip().lower()


def hidden_states(text_encoder: CLIPTextModel, ids: Tensor, penultimate: bool = False) -> tuple[Tensor, Tensor | None]:
    """(token embeddings, pooled) of (batch, context) ids. The embeddings: the last hidden state, or
    with `penultimate` the one before it, which skips the final LayerNorm too (SDXL conditions on that
    of both its encoders). pooled: a CLIPTextModelWithProjection's projected end-token embedding
    (SDXL's second encoder), else None."""
    out = text_encoder(ids, output_hidden_states=penultimate)
    return (out.hidden_states[-2] if penultimate else out.last_hidden_state), getattr(out, "text_embeds", None)


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> Tensor:
    """(batch,) prompts -> (batch, 77, width) token embeddings: the last hidden state of the
    text encoder, as SD conditions on it (for SD 2.x the saved encoder already stops one layer early).
    Training's captions go through here, cleaned as CLIP cleans them."""
    return text_encoder(caption_ids(tokenizer, text_encoder, prompts)).last_hidden_state


def encode_captions(
    encoders: list[tuple[CLIPTokenizer, CLIPTextModel]], captions: list[str], penultimate: bool
) -> tuple[Tensor, Tensor | None]:
    """Training's captions -> (token embeddings, pooled). SD 1.x/2.x: encode_prompts, no pooled.
    SDXL (`penultimate`, as pipelines.prompts.encode_weighted takes it): each encoder's penultimate
    hidden states side by side and the last one's projected pooled output, as diffusers'
    train_text_to_image_sdxl.py (encode_prompt) conditions."""
    if not penultimate:
        return encode_prompts(*encoders[0], captions), None
    outputs = [
        hidden_states(encoder, caption_ids(tokenizer, encoder, captions), True) for tokenizer, encoder in encoders
    ]
    return torch.cat([text for text, _ in outputs], dim=-1), outputs[-1][1]


def caption_ids(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, captions: list[str]) -> Tensor:
    """Cleaned as CLIP cleans text, padded and cut to the context, on the encoder's device."""
    cleaned = [clean_text(caption) for caption in captions]
    length = tokenizer.model_max_length
    ids = tokenizer(cleaned, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    return ids.to(next(text_encoder.parameters()).device)
