"""Shared fixtures: tiny random models built in code, never downloaded."""

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from ldm.model import LatentDiffusion
from ldm.text import clip_tokenizer
from pipelines import devices


@pytest.fixture(autouse=True)
def cpu_without_bf16(monkeypatch):
    """Every test sees a CPU without bf16 instructions, so `dtype="auto"` means fp32 on any machine
    and the figures compared with diffusers do not depend on the CPU the suite runs on. The bf16
    choice is tested by undoing this (tests/pipelines/test_precision.py)."""
    monkeypatch.setattr(devices, "native_bf16", lambda: None)


# Reduced-width UNets in the shapes of the SD family, as diffusers config dicts.
TINY_UNET = dict(
    block_out_channels=[8, 16],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=8,
    attention_head_dim=2,
    sample_size=8,
)
SD15_SHAPED_UNET = dict(  # SD 1.5's block layout: 8 heads everywhere, conv projections
    block_out_channels=[32, 64, 64, 64],
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=8,
    sample_size=16,
)
SD21_SHAPED_UNET = dict(  # SD 2.1's: constant 16-wide heads, linear projections, fp32 attention
    block_out_channels=[32, 64, 64, 64],
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=40,
    attention_head_dim=[2, 4, 4, 4],
    use_linear_projection=True,
    upcast_attention=True,
    sample_size=16,
)
SDXL_SHAPED_UNET = dict(  # SDXL's: no attention at the highest resolution, deeper transformers lower down,
    # the pooled text (16 wide here) and six size/crop numbers added to the timestep embedding
    block_out_channels=[32, 64, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=[2, 4, 4],
    transformer_layers_per_block=[1, 2, 3],
    use_linear_projection=True,
    upcast_attention=None,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
    sample_size=16,
)
UNET_SHAPES = {
    "tiny": TINY_UNET,
    "sd15-shaped": SD15_SHAPED_UNET,
    "sd21-shaped": SD21_SHAPED_UNET,
    "sdxl-shaped": SDXL_SHAPED_UNET,
}


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Add noise to every weight, so zero-initialised layers hide no wrong path."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def perturbed_tiny_model(preset: str = "tiny") -> LatentDiffusion:
    """A preset's model (tiny, sdxl-tiny) with every weight perturbed, the same each call."""
    torch.manual_seed(0)
    model = LatentDiffusion.from_preset(preset)
    for part in model.parts().values():
        perturb(part.eval())
    return model


@pytest.fixture
def tiny_model() -> LatentDiffusion:
    return perturbed_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The perturbed tiny model saved once, in the diffusers layout, for tests that only read it."""
    directory = tmp_path_factory.mktemp("models") / "tiny"
    perturbed_tiny_model().save(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A perturbed model of the sdxl-tiny preset, saved once in the diffusers SDXL layout."""
    directory = tmp_path_factory.mktemp("models") / "sdxl-tiny"
    perturbed_tiny_model("sdxl-tiny").save(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A CLIP model of a few thousand weights and its processor, saved: what CLIP score reads."""
    torch.manual_seed(0)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=clip_tokenizer(),
    )
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def folder_hash(folder) -> str:
    """One digest of every file's bytes under `folder`: equal means nothing was written there."""
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()
