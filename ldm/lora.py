"""LoRA files: written from a trained adapter, and merged into a model's weights:
W <- W + scale · (alpha / rank) · B A.

Reads and writes the two formats in use: diffusers/peft (`unet.<module>.lora_A.weight`,
`lora_B`, alpha in the `lora_adapter_metadata` of the file, else alpha = rank, as diffusers
assumes) and kohya/A1111 (`lora_unet_<module_with_underscores>.lora_down.weight`, `lora_up`,
`.alpha`). kohya names SD 1.x/2.x UNet layers as diffusers does and SDXL's by the CompVis blocks
(`input_blocks_4_1_...`, its own UNet in library/sdxl_original_unet.py); SDXL's text encoders are
`lora_te1_`/`lora_te2_` there and `text_encoder`/`text_encoder_2` in diffusers. Merging once costs
nothing per step; a LoRA for another architecture is refused.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ldm.model import LatentDiffusion, ModelLoadError
from ldm.single_file import unet_key
from ldm.text import TEXT_PREFIX

SUFFIXES = {  # key ending -> which factor
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
}


def read_lora(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"LoRA {path}: not a readable .safetensors file ({error})") from None


def lora_targets(model: LatentDiffusion) -> dict[str, nn.Module]:
    """Every layer a LoRA may change, under each name the formats give it."""
    targets = {}
    for name, module in model.unet.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            targets[f"unet.{name}"] = module
            for spelling in (name, compvis_name(name, model)):
                targets["lora_unet_" + spelling.replace(".", "_")] = module
    for part, encoder in model.text_parts().items():
        for name, module in encoder.named_modules():
            if isinstance(module, nn.Linear):  # files of transformers 4 and 5: with and without `text_model.`
                short, full = name.removeprefix(TEXT_PREFIX), TEXT_PREFIX + name.removeprefix(TEXT_PREFIX)
                targets[f"{part}.{short}"] = targets[f"{part}.{full}"] = module
                targets[kohya_prefix(part, model) + full.replace(".", "_")] = module
    return targets


def kohya_prefix(part: str, model: LatentDiffusion) -> str:
    """kohya's networks/lora.py: lora_unet_, lora_te_ (SD 1.x/2.x), lora_te1_ and lora_te2_ (SDXL)."""
    if part == "unet":
        return "lora_unet_"
    return {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[part] if model.is_sdxl else "lora_te_"


def compvis_name(name: str, model: LatentDiffusion) -> str:
    """A UNet layer's CompVis name (`input_blocks.4.1.proj_in` for `down_blocks.1.attentions.0.proj_in`)."""
    return unet_key(f"{name}.weight", model.unet.config).removesuffix(".weight")


def alpha_over_rank(metadata: dict[str, str], layer: str) -> float | None:
    """diffusers keeps peft's lora_alpha and r per model part in the file's metadata."""
    if "lora_adapter_metadata" not in metadata:
        return None
    config = json.loads(metadata["lora_adapter_metadata"])
    part = layer.split(".")[0]
    if f"{part}.lora_alpha" in config and f"{part}.r" in config:
        return config[f"{part}.lora_alpha"] / config[f"{part}.r"]
    return None


@torch.no_grad()
def merge_lora(model: LatentDiffusion, path: str | Path, scale: float = 1.0) -> int:
    """Add the LoRA's updates to the model's weights; return how many layers it changed."""
    path = Path(path)
    state, metadata = read_lora(path)
    factors: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ModelLoadError(f"LoRA {path}: {key!r} is not a LoRA weight (lora_A/B, lora_down/up or alpha)")
        factors.setdefault(key.removesuffix(suffix), {})[SUFFIXES[suffix]] = value
    targets = lora_targets(model)
    for layer, parts in factors.items():
        if layer not in targets:
            raise ModelLoadError(f"LoRA {path}: {layer!r} matches no layer of this model (a LoRA for another model?)")
        if "down" not in parts or "up" not in parts:
            raise ModelLoadError(f"LoRA {path}: {layer!r} lacks its down or up matrix")
        weight = targets[layer].weight
        down, up = parts["down"].flatten(1).float(), parts["up"].flatten(1).float()  # (rank, in), (out, rank)
        rank = down.shape[0]
        ratio = parts["alpha"].item() / rank if "alpha" in parts else alpha_over_rank(metadata, layer)
        ratio = 1.0 if ratio is None else ratio
        update = scale * ratio * (up @ down)
        if update.numel() != weight.numel():
            raise ModelLoadError(
                f"LoRA {path}: {layer!r} has shape {tuple(update.shape)}, the layer {tuple(weight.shape)}"
            )
        weight += update.reshape(weight.shape).to(weight.dtype)
    return len(factors)


def lora_file(
    model: LatentDiffusion,
    adapters: dict[str, dict[str, Tensor]],
    targets: dict[str, list[str]],
    alpha: float,
    kind: str,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a LoRA file, from peft's adapter weights per model part
    (`unet`, `text_encoder`, `text_encoder_2`; keys `<module>.lora_A.weight` and `.lora_B.weight`)
    and the module names each part's adapter targets.

    kind "kohya": `lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight` and an
    `.alpha` per module, as kohya's networks/lora.py writes them (SDXL's UNet by its CompVis
    names) and A1111's Lora extension (extensions-builtin/Lora/networks.py,
    convert_diffusers_name_to_compvis) and ComfyUI read them.
    kind "diffusers": peft's keys under `unet.`/`text_encoder.`/`text_encoder_2.`, with rank and
    alpha per part in `lora_adapter_metadata`, as diffusers' `save_lora_weights` writes them."""
    tensors, metadata, options = {}, {}, {}
    for part, state in adapters.items():
        for key, value in state.items():
            if part != "unet" and not key.startswith(TEXT_PREFIX):  # files spell CLIP's names in full
                key = TEXT_PREFIX + key
            module, _, factor = key.rpartition(".lora_")  # factor: "A.weight" or "B.weight"
            if kind == "diffusers":
                tensors[f"{part}.{key}"] = value
                continue
            if part == "unet" and model.is_sdxl:
                module = compvis_name(module, model)
            name = kohya_prefix(part, model) + module.replace(".", "_")
            down = factor == "A.weight"
            tensors[f"{name}.lora_{'down' if down else 'up'}.weight"] = value
            if down:
                tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=value.dtype)
        rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
        options |= {f"{part}.r": rank, f"{part}.lora_alpha": alpha, f"{part}.target_modules": targets[part]}
    if kind == "diffusers":
        metadata["lora_adapter_metadata"] = json.dumps(options, sort_keys=True)
    return tensors, metadata
