"""Original Stable Diffusion single-file checkpoints (`.safetensors`, `.ckpt`), as A1111 and ComfyUI
use them: one state dict with the CompVis names, `model.diffusion_model.*` (UNet),
`first_stage_model.*` (VAE) and `cond_stage_model.*` (text encoder). SDXL's (Stability's
generative-models names) keep the UNet and VAE names and hold its two text encoders as
`conditioner.embedders.0.transformer.*` (CLIP ViT-L, transformers' names) and
`conditioner.embedders.1.model.*` (OpenCLIP bigG, OpenCLIP's names, with its projection). The
SDXL refiner's holds OpenCLIP bigG alone, as `conditioner.embedders.0.model.*`.

Reading converts with diffusers' own single-file helpers and builds the architecture from the
presets that ship here (sd15, sd21 for an OpenCLIP text encoder, sdxl for SDXL's embedders,
sdxl-refiner for the refiner's one), so no network is needed. Writing is the inverse map,
written out below. A file written here also records, in its header's `ldm_toolkit.model`, the
model's architecture (its preset sections, the scheduler and the VAE's latent scaling among them)
and its sampling defaults, so it loads by itself to the model it was written from.
"""

import json
import pickle
import re
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import DDIMScheduler
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from ldm.files import SINGLE_FILE_SUFFIXES, OutputExists
from ldm.model import LatentDiffusion, ModelLoadError, SamplingDefaults, load_exactly, read_preset, save_safetensors
from ldm.text import text_state_for_files, text_state_from_files
from ldm.unet import UNetConfig
from ldm.unet.config import FIXED_FIELDS

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_CLIP, SDXL_OPEN_CLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
REFINER_OPEN_CLIP = "conditioner.embedders.0.model."
RECORD = "ldm_toolkit.model"  # header key: {"spec": preset sections, "sampling": ..., "force_zeros_...": ...}
RESNET = {  # diffusers -> CompVis names inside a UNet ResNet block
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A .safetensors file, or a .ckpt/.pth through weights-only unpickling (no code runs from the file)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        if path.suffix in (".ckpt", ".pth"):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            return checkpoint.get("state_dict", checkpoint)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ModelLoadError(f"{path}: not a readable checkpoint ({str(error).splitlines()[0]})") from None
    except pickle.UnpicklingError as error:  # the file holds more than tensors
        raise ModelLoadError(f"{path}: cannot be loaded weights-only ({type(error).__name__})") from None
    raise ModelLoadError(f"{path}: a single-file checkpoint must be .safetensors, .ckpt or .pth")


def load_model(source: str | Path, preset: str | None = None, dtype: torch.dtype = torch.float32) -> LatentDiffusion:
    """A diffusers-layout folder or hub id (its UNet and text encoders in `dtype`), or a single file (built
    from `preset`, in the file's precision: see load_single_file)."""
    if str(source).endswith(SINGLE_FILE_SUFFIXES):
        return load_single_file(source, preset)
    return LatentDiffusion.load(source, dtype)


def load_single_file(path: str | Path, preset: str | None = None) -> LatentDiffusion:
    """Build the model from the architecture the file records (written here), else from the preset
    (default: sdxl or sdxl-refiner for SDXL's embedders, sd21 for an OpenCLIP text encoder, else
    sd15; the UNet's input channels from its first conv, so inpainting checkpoints load), and fill
    in the weights."""
    path = Path(path)
    state = read_state_dict(path)
    if not any(key.startswith(UNET) for key in state):
        raise ModelLoadError(f"{path}: no {UNET}* weights: not a Stable Diffusion checkpoint")
    sdxl = any(key.startswith(SDXL_OPEN_CLIP) for key in state)
    refiner = not sdxl and any(key.startswith(REFINER_OPEN_CLIP) for key in state)
    open_clip = any(key.startswith(OPEN_CLIP) for key in state)
    record = None if preset else read_record(path)
    default = "sdxl" if sdxl else "sdxl-refiner" if refiner else "sd21" if open_clip else "sd15"
    spec = record["spec"] if record else read_preset(preset or default)
    first_conv = f"{UNET}input_blocks.0.0.weight"
    if first_conv not in state:
        raise ModelLoadError(f"{path}: no {first_conv}: not a whole Stable Diffusion UNet")
    spec["unet"]["in_channels"] = state[first_conv].shape[1]
    with init_empty_weights():  # weights on the meta device, then the file's put in their place: no random
        model = LatentDiffusion.from_spec(spec)  # copy first, so loading SDXL takes about the file's memory
    if model.is_refiner != refiner:
        raise ModelLoadError(f"{path}: {'an SDXL refiner' if refiner else 'not an SDXL refiner'}; "
                             f"the preset {preset!r} does not fit it")  # fmt: skip
    try:
        _load_weights(model, state, sdxl, refiner, open_clip)
    except ModelLoadError as error:
        if record:
            raise
        raise ModelLoadError(
            f"{path}: not the {preset or default} architecture ({error}); name its architecture with "
            f"`python -m commands.convert {path} FOLDER --preset NAME` (ldm/presets/ or a .yaml) and use FOLDER"
        ) from None
    if record:
        model.sampling = record["sampling"] and SamplingDefaults(**record["sampling"])
        model.force_zeros_for_empty_prompt = record["force_zeros_for_empty_prompt"]
    elif "v_pred" in state or "ztsnr" in state:  # the markers save_single_file writes (and ComfyUI reads)
        changes = {"prediction_type": "v_prediction"} if "v_pred" in state else {}
        scheduler = type(model.scheduler)
        if "ztsnr" in state:  # DDIM takes the rescaled betas as an option (PNDM, the presets' own, does not)
            changes |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
            scheduler = DDIMScheduler
        model.scheduler = scheduler.from_config(model.scheduler.config, **changes)
    return model


def read_record(path: Path) -> dict | None:
    """What a file written here records of its model (RECORD), or None for a file from elsewhere."""
    if path.suffix != ".safetensors":
        return None
    with safe_open(path, framework="pt") as file:
        text = (file.metadata() or {}).get(RECORD)
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        raise ModelLoadError(f"{path}: its {RECORD} header is not JSON") from None


def _load_weights(model: LatentDiffusion, state: dict[str, Tensor], sdxl: bool, refiner: bool, open_clip: bool) -> None:
    unet_config = {**FIXED_FIELDS, **model.unet.config.to_diffusers()}
    load_exactly(model.unet, convert_ldm_unet_checkpoint(state, unet_config), "unet")
    load_exactly(model.vae, convert_ldm_vae_checkpoint(state, dict(model.vae.config)), "vae")
    if not refiner:
        if open_clip:
            text = convert_open_clip_checkpoint(model.text_encoder, state)
        else:
            text = convert_ldm_clip_checkpoint(state, remove_prefix=SDXL_CLIP if sdxl else None)
        _load_text(model.text_encoder, text, "text_encoder")
    if sdxl or refiner:
        prefix = SDXL_OPEN_CLIP if sdxl else REFINER_OPEN_CLIP
        text = convert_open_clip_checkpoint(model.text_encoder_2, state, prefix=prefix)
        _load_text(model.text_encoder_2, text, "text_encoder_2")
    for part in model.parts().values():  # the file's precision, one per part (a few files mix them)
        if len({weight.dtype for weight in part.parameters()}) > 1:
            part.float()


def _load_text(encoder: torch.nn.Module, text: dict[str, Tensor], part: str) -> None:
    """A text encoder's converted weights, less what the file holds and the model does not use
    (SD 2.x files: a 24th layer and a projection; most files: position ids)."""
    text = text_state_from_files(encoder, text)
    expected = encoder.state_dict()
    load_exactly(encoder, {k: v for k, v in text.items() if k in expected}, part)


def save_single_file(model: LatentDiffusion, path: str | Path) -> None:
    """Write the model as one original-format .safetensors file (refusing to overwrite one)."""
    path = Path(path)
    if path.exists():
        raise OutputExists(f"{path} already exists; choose a new name")
    state = {UNET + unet_key(k, model.unet.config): v for k, v in model.unet.state_dict().items()}
    state |= {
        VAE + vae_key(k, len(model.vae.config.block_out_channels)): conv_1x1(k, v)
        for k, v in model.vae.state_dict().items()
    }
    text = {} if model.is_refiner else text_state_for_files(model.text_encoder)
    if model.is_sdxl:  # the refiner's one embedder is OpenCLIP; the base's second
        prefix = REFINER_OPEN_CLIP if model.is_refiner else SDXL_OPEN_CLIP
        state |= {SDXL_CLIP + k: v for k, v in text.items()}
        state |= {prefix + k: v for k, v in open_clip_state(model.text_encoder_2.state_dict()).items()}
    elif model.text_encoder.config.hidden_act == "gelu":  # OpenCLIP, as in SD 2.x
        state |= {OPEN_CLIP + k: v for k, v in open_clip_state(text).items()}
    else:
        state |= {CLIP + k: v for k, v in text.items()}
    scheduler = model.scheduler.config
    v_prediction = scheduler.prediction_type == "v_prediction"
    zero_snr = bool(scheduler.get("rescale_betas_zero_snr", False))
    # ComfyUI (comfy/supported_models.py, model_type) reads these two empty keys as "v-prediction"
    # and "zero terminal SNR"; SD 2.x's v-prediction it also guesses from the weights.
    state |= {"v_pred": torch.zeros(0)} if v_prediction else {}
    state |= {"ztsnr": torch.zeros(0)} if zero_snr else {}
    record = {
        "spec": model.spec(),
        "sampling": model.sampling and asdict(model.sampling),
        "force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt,
    }
    save_safetensors(path, state, model_spec(model, v_prediction) | {RECORD: json.dumps(record)})


def model_spec(model: LatentDiffusion, v_prediction: bool) -> dict[str, str]:
    """Stability's ModelSpec header fields, as kohya's library/sai_model_spec.py writes them (the
    refiner's architecture name is ModelSpec's own; kohya names no refiner)."""
    v2 = model.unet.config.cross_attention_dim == 1024
    if model.is_refiner:
        architecture = "stable-diffusion-xl-v1-refiner"
    elif model.is_sdxl:
        architecture = "stable-diffusion-xl-v1-base"
    elif v2:
        architecture = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
    else:
        architecture = "stable-diffusion-v1"
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.title": "ldm-toolkit export",
    }


def unet_key(key: str, config: UNetConfig) -> str:
    """diffusers UNet key -> CompVis key. Blocks become numbered `input_blocks`/`output_blocks`,
    each holding a ResNet (`.0`), maybe a transformer (`.1`), and the up/down sampler."""
    for prefix, original in unet_prefixes(config).items():
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if ".resnets." in prefix:
                name, _, tail = rest.partition(".")
                rest = f"{RESNET[name]}.{tail}"
            return original + rest
    raise KeyError(key)


def unet_prefixes(config: UNetConfig) -> dict[str, str]:
    per_block = config.layers_per_block + 1  # CompVis numbering: layers, then the sampler
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    if config.addition_embed_type == "text_time":  # SDXL's added conditioning: `label_emb` there
        prefixes |= {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
    for i, kind in enumerate(config.up_block_types):
        for j in range(config.layers_per_block):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{1 + i * per_block + j}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{1 + i * per_block + j}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * per_block}.0.op."
        for j in range(per_block):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * per_block + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * per_block + j}.1."
        sampler_slot = 2 if kind == "CrossAttnUpBlock2D" else 1  # after the transformer, if any
        prefixes[f"up_blocks.{i}.upsamplers.0."] = (
            f"output_blocks.{i * per_block + config.layers_per_block}.{sampler_slot}."
        )
    return prefixes


def vae_key(key: str, blocks: int) -> str:
    """diffusers AutoencoderKL key -> CompVis key (the decoder's blocks are numbered bottom-up there)."""
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{blocks - 1 - int(m.group(1))}.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", key)
    key = key.replace(".resnets.", ".block.").replace(".upsamplers.0.", ".upsample.")
    key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
    for ours, theirs in VAE_ATTENTION.items():
        key = key.replace(f"attn_1.{ours}.", f"attn_1.{theirs}.")
    return key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")


def conv_1x1(key: str, value: Tensor) -> Tensor:
    """The CompVis VAE attention projects with 1x1 convs where diffusers uses Linear layers."""
    is_projection = "attentions" in key and key.endswith("weight") and value.ndim == 2
    return value[:, :, None, None] if is_projection else value


def open_clip_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers CLIPTextModel(WithProjection) state -> OpenCLIP text tower names, q/k/v fused
    into in_proj; OpenCLIP's projection is the transpose of transformers' (x @ text_projection)."""
    out = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
    }
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    for i in sorted(layers):
        ours, theirs = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = (state[f"{ours}self_attn.{p}_proj.{kind}"] for p in "qkv")
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat([q, k, v])
            out[f"{theirs}attn.out_proj.{kind}"] = state[f"{ours}self_attn.out_proj.{kind}"]
            for name, original in OPEN_CLIP_LAYER.items():
                out[f"{theirs}{original}.{kind}"] = state[f"{ours}{name}.{kind}"]
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T
    return out
