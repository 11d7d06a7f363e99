"""Our UNet against diffusers' UNet2DConditionModel: same weights, same outputs, both directions."""

from pathlib import Path

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel

from conftest import UNET_SHAPES, perturb
from ldm.unet import UNet, UNetConfig

CONFIGS = Path(__file__).resolve().parents[2] / "ldm" / "presets"


def diffusers_pair(shape: str) -> tuple[UNet2DConditionModel, UNet]:
    torch.manual_seed(0)
    theirs = perturb(UNet2DConditionModel(**UNET_SHAPES[shape])).eval()
    ours = UNet(UNetConfig.from_diffusers(dict(theirs.config))).eval()
    return theirs, ours


def inputs(unet: UNet, batch: int = 2, height: int = 16, width: int = 16, tokens: int = 7):
    """latents, timesteps, text, and for SDXL-shaped UNets the pooled text and the time ids."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, height, width, generator=generator)
    text = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=generator)
    added = {}
    if unet.config.addition_embed_type:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {
            "pooled": torch.randn(batch, pooled, generator=generator),
            "time_ids": torch.tensor([[1024.0, 768, 0, 64, 1024, 1024], [512, 512, 16, 0, 768, 1344]])[:batch],
        }
    return latents, torch.tensor([3, 901])[:batch], text, added


def run_theirs(theirs: UNet2DConditionModel, latents, timesteps, text, added) -> torch.Tensor:
    if added:
        added = {"added_cond_kwargs": {"text_embeds": added["pooled"], "time_ids": added["time_ids"]}}
    return theirs(latents, timesteps, text, **added).sample


@pytest.mark.parametrize("shape", UNET_SHAPES)
def test_diffusers_weights_load_strictly_and_give_the_same_output(shape):
    theirs, ours = diffusers_pair(shape)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    latents, timesteps, text, added = inputs(ours)
    with torch.no_grad():
        expected = run_theirs(theirs, latents, timesteps, text, added)
        torch.testing.assert_close(ours(latents, timesteps, text, **added), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", UNET_SHAPES)
def test_our_weights_load_strictly_in_diffusers_and_give_the_same_output(shape):
    theirs, ours = diffusers_pair(shape)
    perturb(ours, seed=5)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    latents, timesteps, text, added = inputs(ours)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(latents, timesteps, text, **added),
            run_theirs(theirs, latents, timesteps, text, added),
            atol=1e-4,
            rtol=1e-4,
        )


def test_sdxl_size_conditioning_changes_the_output_and_is_required():
    """The time ids reach the output (a UNet that ignored them would pass the parity tests only
    if diffusers ignored them too); leaving them out is an error, not a silent default."""
    _, ours = diffusers_pair("sdxl-shaped")
    latents, timesteps, text, added = inputs(ours)
    with torch.no_grad():
        moved = {**added, "time_ids": added["time_ids"] + torch.tensor([0.0, 0, 0, 0, 256, 0])}
        assert not torch.allclose(ours(latents, timesteps, text, **added), ours(latents, timesteps, text, **moved))
        with pytest.raises(ValueError, match="needs pooled and time_ids"):
            ours(latents, timesteps, text)


def test_odd_latent_sizes_upsample_to_the_skip_size_as_diffusers_does():
    theirs, ours = diffusers_pair("sd15-shaped")
    ours.load_state_dict(theirs.state_dict())
    latents, timesteps, text, _ = inputs(ours, height=12, width=20)  # 12 -> 6 -> 3 -> 2: not a power of two
    with torch.no_grad():
        out = ours(latents, timesteps, text)
        assert out.shape == latents.shape
        torch.testing.assert_close(out, theirs(latents, timesteps, text).sample, atol=1e-4, rtol=1e-4)


def test_one_timestep_for_the_whole_batch():
    _, ours = diffusers_pair("tiny")
    latents, _, text, _ = inputs(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(latents, 500, text), ours(latents, torch.tensor([500, 500]), text))


@pytest.mark.parametrize("preset, expected", [("sd15", 859_520_964), ("sd21", 865_910_724)])
def test_sd_presets_have_the_parameter_count_of_diffusers(preset, expected):
    config = yaml.safe_load((CONFIGS / f"{preset}.yaml").read_text())["unet"]
    with torch.device("meta"):  # shapes only: no 3.4 GB of weights
        ours = UNet(UNetConfig.from_diffusers(config))
        theirs = UNet2DConditionModel(**config)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(ours) == count(theirs) == expected
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
