"""What to fetch from the Hugging Face hub for a model id: the parts its model_index.json names, each
part's configs and tokenizer files, and one copy of its weights.

diffusers' `DiffusionPipeline.download` (src/diffusers/pipelines/pipeline_utils.py, with
`variant_compatible_siblings` and `_get_ignore_patterns` in pipeline_loading_utils.py, commit
58eb52c0) reads model_index.json for the folders to fetch and the repository's file listing for
their files, then prefers safetensors to .bin and skips fp16 variants unless asked.
We do the same from the repository's file listing: a part's `.safetensors` (one file, or the shards
its `.index.json` names), else its `.bin`; never the fp16 variant, EMA copies, ONNX, Flax or the
single-file checkpoints at the top of the repository. An SDXL repository has `tokenizer_2/` and
`text_encoder_2/`; a refiner's only those (its index says null for the first pair).
"""

import json
from pathlib import Path

from ldm.errors import UserError

WEIGHT_STEMS = {  # part -> its weights file's name without the suffix, as transformers and diffusers save
    "text_encoder": "model",
    "text_encoder_2": "model",
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
}
BIN_STEMS = {"model": "pytorch_model", "diffusion_pytorch_model": "diffusion_pytorch_model"}
CONFIG_PARTS = ("tokenizer", "tokenizer_2", "scheduler")  # configs and vocabularies, no weights


class HubError(UserError):
    """A hub id that cannot be fetched or holds no model we read; one line."""


def fetch_patterns(index: dict, files: list[str], extra: tuple[str, ...] = ()) -> list[str]:
    """allow_patterns for snapshot_download: model_index.json, `extra` top-level files, and for each
    part the index names (not null) its *.json and *.txt and one copy of its weights."""
    patterns = ["model_index.json", *extra]
    named = [part for part in (*WEIGHT_STEMS, *CONFIG_PARTS) if (index.get(part) or [None])[0] is not None]
    for part in named:
        patterns += [f"{part}/*.json", f"{part}/*.txt"]
        if part in WEIGHT_STEMS:
            patterns += _weights(part, WEIGHT_STEMS[part], set(files))
    return patterns


def _weights(part: str, stem: str, files: set[str]) -> list[str]:
    for name in (f"{stem}.safetensors", f"{BIN_STEMS[stem]}.bin"):
        if f"{part}/{name}" in files:
            return [f"{part}/{name}"]
        if f"{part}/{name}.index.json" in files:  # sharded: the shards the index names
            base, suffix = name.rsplit(".", 1)
            return [f"{part}/{base}-*-of-*.{suffix}"]
    raise HubError(f"{part}/ has no {stem}.safetensors or {BIN_STEMS[stem]}.bin (an fp16 variant alone is not read)")


def download(repo_id: str, extra: tuple[str, ...] = ()) -> Path:
    """The model's folder in the local hub cache, fetching what fetch_patterns names."""
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        index_file = Path(snapshot_download(repo_id, allow_patterns=["model_index.json"])) / "model_index.json"
        index = json.loads(index_file.read_text()) if index_file.is_file() else None
        files = list_repo_files(repo_id) if index else []
    except (HFValidationError, OSError) as error:
        raise HubError(
            f"{repo_id!r} is not a model folder, and the hub could not provide it ({type(error).__name__})"
        ) from None
    if index is None:
        raise HubError(f"{repo_id}: no model_index.json there: not a diffusers model repository")
    try:
        patterns = fetch_patterns(index, files, extra)
    except HubError as error:
        raise HubError(f"{repo_id}: {error}") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except OSError as error:
        raise HubError(f"{repo_id}: the download stopped ({type(error).__name__}: {error})") from None
