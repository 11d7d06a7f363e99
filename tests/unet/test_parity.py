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
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, height, width, generator=generator)
    text = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([3, 901])[:batch], text


@pytest.mark.parametrize("shape", UNET_SHAPES)
def test_diffusers_weights_load_strictly_and_give_the_same_output(shape):
    theirs, ours = diffusers_pair(shape)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    latents, timesteps, text = inputs(ours)
    with torch.no_grad():
        expected = theirs(latents, timesteps, text).sample
        torch.testing.assert_close(ours(latents, timesteps, text), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", UNET_SHAPES)
def test_our_weights_load_strictly_in_diffusers_and_give_the_same_output(shape):
    theirs, ours = diffusers_pair(shape)
    perturb(ours, seed=5)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    latents, timesteps, text = inputs(ours)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(latents, timesteps, text), theirs(latents, timesteps, text).sample, atol=1e-4, rtol=1e-4
        )


def test_odd_latent_sizes_upsample_to_the_skip_size_as_diffusers_does():
    theirs, ours = diffusers_pair("sd15-shaped")
    ours.load_state_dict(theirs.state_dict())
    latents, timesteps, text = inputs(ours, height=12, width=20)  # 12 -> 6 -> 3 -> 2: not a power of two
    with torch.no_grad():
        out = ours(latents, timesteps, text)
        assert out.shape == latents.shape
        torch.testing.assert_close(out, theirs(latents, timesteps, text).sample, atol=1e-4, rtol=1e-4)


def test_one_timestep_for_the_whole_batch():
    _, ours = diffusers_pair("tiny")
    latents, _, text = inputs(ours)
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
