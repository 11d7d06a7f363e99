"""SDXL LoRA files, merged here and fused by diffusers 0.42.1 (`StableDiffusionXLPipeline.load_lora_weights`
then `fuse_lora`, which reads kohya's CompVis-named SDXL keys through
loaders/lora_conversion_utils.py, `_maybe_map_sgm_blocks_to_diffusers`): the same weights."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from ldm.lora import lora_targets, merge_lora
from ldm.model import LatentDiffusion

PARTS = ("unet", "text_encoder", "text_encoder_2")
TRANSFORMER_LAYERS = ("attn1", "attn2", "ff_net", "proj_in", "proj_out")
SCALE = 0.7


def kohya_sdxl_lora(model: LatentDiffusion) -> dict[str, torch.Tensor]:
    """A random rank-2 LoRA on every transformer Linear layer of the UNet, in the CompVis block
    names kohya's SDXL UNet has, and on both text encoders' attention (`lora_te1_`, `lora_te2_`)."""
    generator = torch.Generator().manual_seed(1)
    state = {}
    for name, module in lora_targets(model).items():
        unet = name.startswith("lora_unet_") and "_blocks_" in name and any(k in name for k in TRANSFORMER_LAYERS)
        text = name.startswith(("lora_te1_", "lora_te2_")) and "self_attn" in name
        if not (unet or text) or "down_blocks" in name or "up_blocks" in name or "mid_block" in name:
            continue
        out_features, in_features = module.weight.shape[:2]
        state[f"{name}.lora_down.weight"] = torch.randn(2, in_features, generator=generator) * 0.3
        state[f"{name}.lora_up.weight"] = torch.randn(out_features, 2, generator=generator) * 0.3
        state[f"{name}.alpha"] = torch.tensor(1.0)
    return state


def fused_by_diffusers(model_dir, lora_path, scale: float = SCALE) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(lora_path)
    pipe.fuse_lora(lora_scale=scale, components=list(PARTS))
    pipe.unload_lora_weights()
    return pipe


def assert_same_weights(model: LatentDiffusion, pipe: StableDiffusionXLPipeline, base: LatentDiffusion) -> None:
    """Every weight of the three parts the same in both, and some changed in each."""
    for part in PARTS:
        ours, theirs = getattr(model, part).state_dict(), getattr(pipe, part).state_dict()
        unchanged = getattr(base, part).state_dict()
        changed = [key for key in ours if not torch.equal(ours[key], unchanged[key])]
        assert changed, f"the LoRA changed nothing in {part}"
        for key, value in ours.items():
            torch.testing.assert_close(value, theirs[key], atol=1e-5, rtol=1e-5, msg=f"{part}.{key}")


def test_a_kohya_sdxl_lora_merges_as_diffusers_fuses_it(tiny_sdxl_dir, tmp_path):
    model = LatentDiffusion.load(tiny_sdxl_dir)
    state = kohya_sdxl_lora(model)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k.alpha" in state  # down block 1, layer 0
    assert "lora_unet_output_blocks_0_1_proj_out.alpha" in state
    assert any(key.startswith("lora_te2_text_model_encoder_layers_1_self_attn") for key in state)
    save_file(state, tmp_path / "kohya_sdxl.safetensors")
    layers = merge_lora(model, tmp_path / "kohya_sdxl.safetensors", scale=SCALE)
    assert layers == len(state) // 3
    base = LatentDiffusion.load(tiny_sdxl_dir)
    assert_same_weights(model, fused_by_diffusers(tiny_sdxl_dir, tmp_path / "kohya_sdxl.safetensors"), base)


def test_a_diffusers_sdxl_lora_merges_as_diffusers_fuses_it(tiny_sdxl_dir, tmp_path):
    """Adapters on the UNet and both text encoders, saved by `StableDiffusionXLPipeline.save_lora_weights`."""
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    unet_config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "proj_in"], init_lora_weights=False)
    text_config = LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "out_proj"], init_lora_weights=False)
    pipe.unet.add_adapter(unet_config)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):  # transformers' add_adapter wants peft 0.22
        inject_adapter_in_model(text_config, encoder)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
        text_encoder_2_lora_adapter_metadata=text_config.to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    model = LatentDiffusion.load(tiny_sdxl_dir)
    merge_lora(model, path, scale=SCALE)
    assert_same_weights(model, fused_by_diffusers(tiny_sdxl_dir, path), LatentDiffusion.load(tiny_sdxl_dir))


@pytest.mark.parametrize("key", ["lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_x"])
def test_text_encoder_names_follow_the_model_family(tiny_model_dir, key):
    """kohya writes lora_te_ for SD 1.x/2.x and lora_te1_/lora_te2_ for SDXL (networks/lora.py)."""
    targets = lora_targets(LatentDiffusion.load(tiny_model_dir))
    assert (key in targets) == key.startswith("lora_te_")
    assert not any(name.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for name in targets)
