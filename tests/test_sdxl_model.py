"""SDXL models: presets, and save/load in the diffusers StableDiffusionXLPipeline layout, both directions."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from conftest import perturbed_tiny_model
from ldm.errors import ConfigError
from ldm.model import LatentDiffusion, ModelLoadError, read_preset
from ldm.unet import UNet


@pytest.fixture
def tiny_sdxl() -> LatentDiffusion:
    return perturbed_tiny_model("sdxl-tiny")


def unet_output(unet, model: LatentDiffusion) -> torch.Tensor:
    """Ours or diffusers' UNet on the same inputs: the pooled text and time ids as each takes them."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=generator)
    pooled = torch.randn(1, model.text_encoder_2.config.projection_dim, generator=generator)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    with torch.no_grad():
        if isinstance(unet, UNet):
            return unet(latents, torch.tensor([250]), text, pooled, time_ids)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return unet(latents, torch.tensor([250]), text, added_cond_kwargs=added).sample


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0)


def test_the_sdxl_preset_has_the_published_part_sizes():
    """The UNet as diffusers counts the SDXL base config; the text encoders, CLIP ViT-L and OpenCLIP bigG."""
    with torch.device("meta"):  # shapes only
        model = LatentDiffusion.from_preset("sdxl")
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in model.parts().items()}
    assert counts == {
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
        "unet": 2_567_463_684,
        "vae": 83_653_863,
    }
    assert model.is_sdxl and model.force_zeros_for_empty_prompt and model.tokenizer_2.pad_token == "!"


def test_the_sdxl_refiner_preset_counts_as_diffusers_counts_its_config():
    """Stability's sd_xl_refiner.yaml in diffusers' terms: diffusers' UNet2DConditionModel built from
    the same config has as many weights as ours; the text encoder is SDXL's OpenCLIP bigG."""
    with torch.device("meta"):
        model = LatentDiffusion.from_preset("sdxl-refiner")
        theirs = UNet2DConditionModel(**model.unet.config.to_diffusers())
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in model.parts().items()}
    assert counts == {"text_encoder_2": 694_659_840, "unet": 2_259_526_660, "vae": 83_653_863}
    assert sum(p.numel() for p in theirs.parameters()) == 2_259_526_660
    assert model.is_refiner and not model.force_zeros_for_empty_prompt


def test_what_we_save_loads_in_diffusers_sdxl_pipeline(tiny_sdxl, tmp_path):
    tiny_sdxl.save(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(unet_output(pipe.unet, tiny_sdxl), unet_output(tiny_sdxl.unet, tiny_sdxl))
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(pipe, name), getattr(tiny_sdxl, name))
    prompt = "a photograph of an astronaut riding a horse"
    assert (
        pipe.tokenizer_2(prompt, padding="max_length").input_ids
        == tiny_sdxl.tokenizer_2(prompt, padding="max_length").input_ids
    )
    assert pipe.tokenizer_2.pad_token == "!"


def test_what_diffusers_saves_loads_in_ours_and_round_trips(tiny_sdxl, tmp_path):
    tiny_sdxl.save(tmp_path / "ours")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        for p in [*pipe.unet.parameters(), *pipe.text_encoder_2.parameters()]:
            p.mul_(1.5)  # make sure we read diffusers' files, not our original
    pipe.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    loaded = LatentDiffusion.load(tmp_path / "theirs")
    assert loaded.is_sdxl and loaded.force_zeros_for_empty_prompt
    torch.testing.assert_close(unet_output(loaded.unet, loaded), unet_output(pipe.unet, loaded), atol=1e-4, rtol=1e-4)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(loaded, name), getattr(pipe, name))
    again = LatentDiffusion.load(tmp_path / "ours")
    for name, part in tiny_sdxl.parts().items():
        assert_same_weights(again.parts()[name], part)
    assert again.unet.config == tiny_sdxl.unet.config and again.tokenizer_2.pad_token == "!"


def test_a_missing_second_text_encoder_is_named(tiny_sdxl, tmp_path):
    tiny_sdxl.save(tmp_path / "model")
    shutil.rmtree(tmp_path / "model" / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="the text_encoder_2/ part is missing"):
        LatentDiffusion.load(tmp_path / "model")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"unet": {"cross_attention_dim": 8}}, "cross_attention_dim=8, but the text is 20 wide"),
        ({"tokenizer_2": {"model_max_length": 100}}, "tokenizer_2 config: model_max_length=100 exceeds the text"),
        ({"unet": {"projection_class_embeddings_input_dim": 37}}, "not the 12-wide pooled text plus 6"),
        (
            {"text_encoder_2": None, "unet": {"cross_attention_dim": 8}},
            "needs a UNet with addition_embed_type 'text_time', and only it",
        ),
    ],
)
def test_parts_whose_widths_disagree_are_refused(change, message):
    spec = read_preset("sdxl-tiny")
    for section, fields in change.items():
        if fields is None:
            del spec[section]
        else:
            spec[section] |= fields
    with pytest.raises(ConfigError, match=message):
        LatentDiffusion.from_spec(spec)
