"""The ControlNet model against diffusers 0.42.1's ControlNetModel (models/controlnets/controlnet.py):
the same state dict and config both ways (strict), the same residuals, and our UNet adding them as
UNet2DConditionModel does (down_block_additional_residuals, mid_block_additional_residual)."""

import json

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from conftest import perturb, perturbed_tiny_model
from ldm.controlnet import ControlNet, ControlNetConfig
from ldm.model import ModelLoadError


@pytest.fixture(params=["tiny", "sdxl-tiny"])
def preset(request):
    return request.param


def inputs(model, batch: int = 2, size: int = 8) -> dict:
    """Random latents, text, control image (and SDXL's added conditioning) for `model`."""
    generator = torch.Generator().manual_seed(0)
    cfg = model.unet.config
    options = {
        "latents": torch.randn(batch, 4, size, size, generator=generator),
        "text": torch.randn(batch, 7, cfg.cross_attention_dim, generator=generator),
        "image": torch.rand(batch, 3, 8 * size, 8 * size, generator=generator),
    }
    if model.is_sdxl:
        pooled = model.text_encoder_2.config.projection_dim
        options |= {"pooled": torch.randn(batch, pooled, generator=generator), "time_ids": torch.rand(batch, 6) * 64}
    return options


def theirs_call(theirs: ControlNetModel, args: dict, timestep: int, scale: float):
    added = {"text_embeds": args["pooled"], "time_ids": args["time_ids"]} if "pooled" in args else None
    return theirs(args["latents"], timestep, args["text"], args["image"], conditioning_scale=scale,
                  added_cond_kwargs=added, return_dict=False)  # fmt: skip


def test_our_controlnet_is_diffusers_both_ways(preset, tmp_path):
    model = perturbed_tiny_model(preset)
    ours = perturb(ControlNet.from_unet(model.unet), seed=3)  # zero convs made non-zero: every path counts
    ours.save(tmp_path / "ours")
    theirs = ControlNetModel.from_pretrained(tmp_path / "ours")
    assert set(theirs.state_dict()) == set(ours.state_dict())
    theirs.save_pretrained(tmp_path / "theirs")
    again = ControlNet.load(tmp_path / "theirs")
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    args = inputs(model)
    with torch.no_grad():
        down, mid = ours(
            args["latents"], 500, args["text"], args["image"], 0.7, args.get("pooled"), args.get("time_ids")
        )
        their_down, their_mid = theirs_call(theirs, args, 500, 0.7)
    assert len(down) == len(their_down)
    for a, b in zip(down, their_down, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mid, their_mid, atol=1e-5, rtol=1e-4)


def test_from_unet_copies_the_encoder_as_diffusers_does(tmp_path):
    model = perturbed_tiny_model()
    model.save(tmp_path / "model")
    theirs = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tmp_path / "model" / "unet"))
    ours = ControlNet.from_unet(model.unet)
    written = json.loads(json.dumps(ours.config.to_diffusers()))
    written.pop("_class_name")
    assert {key: json.loads(json.dumps(theirs.config[key])) for key in written} == written
    for key, value in theirs.state_dict().items():
        if key.startswith("controlnet_cond_embedding.") and not key.startswith("controlnet_cond_embedding.conv_out"):
            continue  # fresh random layers in both
        assert torch.equal(ours.state_dict()[key], value), key


def test_the_unet_adds_the_residuals_as_diffusers_does(preset, tmp_path):
    model = perturbed_tiny_model(preset)
    model.save(tmp_path / "model")
    theirs = UNet2DConditionModel.from_pretrained(tmp_path / "model" / "unet")
    controlnet = perturb(ControlNet.from_unet(model.unet), seed=5)
    args = inputs(model)
    added = {"pooled": args.get("pooled"), "time_ids": args.get("time_ids")} if model.is_sdxl else {}
    with torch.no_grad():
        down, mid = controlnet(args["latents"], 300, args["text"], args["image"], 1.0, **added)
        ours = model.unet(args["latents"], 300, args["text"], **added, control=(down, mid))
        plain = model.unet(args["latents"], 300, args["text"], **added)
        kwargs = {"added_cond_kwargs": {"text_embeds": added["pooled"], "time_ids": added["time_ids"]}} if added else {}
        expected = theirs(args["latents"], 300, args["text"], down_block_additional_residuals=down,
                          mid_block_additional_residual=mid, **kwargs).sample  # fmt: skip
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours, plain, atol=1e-3)


def test_a_controlnet_of_another_family_or_kind_is_refused(tmp_path):
    sd, sdxl = perturbed_tiny_model(), perturbed_tiny_model("sdxl-tiny")
    with pytest.raises(ModelLoadError, match="controlnet: made for a UNet with"):
        ControlNet.from_unet(sdxl.unet).fits(sd.unet)
    sd.save(tmp_path / "model")
    with pytest.raises(ModelLoadError, match="a UNet2DConditionModel folder, not a ControlNet"):
        ControlNet.load(tmp_path / "model" / "unet")
    config = ControlNet.from_unet(sd.unet).config.to_diffusers() | {"global_pool_conditions": True}
    with pytest.raises(Exception, match="global_pool_conditions=true"):
        ControlNetConfig.from_diffusers(config)


def test_original_single_files_read_as_diffusers_converts_them(tmp_path):
    """Our original-layout names against diffusers' own converter (single_file_utils.py,
    convert_controlnet_checkpoint, 0.42.1) on a file with SD's 8x conditioning embedding."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    model = perturbed_tiny_model()
    ours = perturb(ControlNet.from_unet(model.unet, 8), seed=6)
    ours.save_single_file(tmp_path / "control_tiny.safetensors")
    state = load_file(tmp_path / "control_tiny.safetensors")
    for name in ("control_model.input_hint_block.14.weight", "control_model.zero_convs.0.0.weight",
                 "control_model.middle_block_out.0.bias", "control_model.time_embed.0.weight",
                 "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"):  # fmt: skip
        assert name in state, name
    theirs = convert_controlnet_checkpoint(state, ours.config.to_diffusers())
    assert set(theirs) == set(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs[key], value), key
    again = ControlNet.load_single_file(tmp_path / "control_tiny.safetensors", model.unet.config)
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_a_single_file_for_another_family_is_refused_in_one_line(tmp_path):
    sd, sdxl = perturbed_tiny_model(), perturbed_tiny_model("sdxl-tiny")
    ControlNet.from_unet(sdxl.unet, 2).save_single_file(tmp_path / "sdxl.safetensors")
    with pytest.raises(ModelLoadError) as error:
        ControlNet.load_single_file(tmp_path / "sdxl.safetensors", sd.unet.config)
    assert "weight(s) a ControlNet for this model has not, e.g. input_blocks." in str(error.value)
    assert "\n" not in str(error.value)
    again = ControlNet.load_single_file(tmp_path / "sdxl.safetensors", sdxl.unet.config)
    assert again.config.conditioning_embedding_out_channels == (16, 32)
