"""LoRA merging, checked against diffusers + peft running the same adapter unmerged."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ldm.lora import merge_lora
from ldm.model import LatentDiffusion, ModelLoadError


@pytest.fixture
def diffusers_lora(tiny_model_dir, tmp_path):
    """A random rank-2, alpha-4 adapter on the attention projections, saved by diffusers."""
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet), unet_lora_adapter_metadata=config.to_dict()
    )
    return pipe, tmp_path / "pytorch_lora_weights.safetensors"


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 8, generator=generator)
    with torch.no_grad():
        out = unet(latents, torch.tensor([300]), text)
    return out.sample if hasattr(out, "sample") else out


def test_merged_lora_equals_diffusers_running_the_adapter(tiny_model_dir, diffusers_lora):
    pipe, path = diffusers_lora
    model = LatentDiffusion.load(tiny_model_dir)
    before = unet_output(model.unet)
    assert merge_lora(model, path) == 32  # 4 projections x 2 attentions x 4 transformer blocks
    expected = unet_output(pipe.unet)
    assert not torch.allclose(before, expected, atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(unet_output(model.unet), expected, atol=1e-5, rtol=1e-5)


def test_kohya_keys_with_alpha_merge_the_same(tiny_model_dir, diffusers_lora, tmp_path):
    _, path = diffusers_lora
    kohya = {}
    for key, value in load_file(path).items():
        layer, factor = key.removeprefix("unet.").rsplit(".lora_", 1)
        stem = "lora_unet_" + layer.replace(".", "_")
        kohya[f"{stem}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = value
        kohya[f"{stem}.alpha"] = torch.tensor(4.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    a, b = LatentDiffusion.load(tiny_model_dir), LatentDiffusion.load(tiny_model_dir)
    merge_lora(a, path, scale=0.5)
    merge_lora(b, tmp_path / "kohya.safetensors", scale=0.5)
    for key, value in a.unet.state_dict().items():
        torch.testing.assert_close(b.unet.state_dict()[key], value)


def test_a_text_encoder_lora_changes_the_text_encoder(tiny_model_dir, tmp_path):
    model = LatentDiffusion.load(tiny_model_dir)
    layer = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    down, up = torch.randn(1, 8), torch.randn(8, 1)
    save_file({f"{layer}.lora_down.weight": down, f"{layer}.lora_up.weight": up}, tmp_path / "te.safetensors")
    weights = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    merge_lora(model, tmp_path / "te.safetensors", scale=2.0)
    changed = {k for k, v in model.text_encoder.state_dict().items() if not torch.equal(v, weights[k])}
    assert len(changed) == 1 and next(iter(changed)).endswith("layers.0.self_attn.q_proj.weight")
    key = next(iter(changed))
    torch.testing.assert_close(model.text_encoder.state_dict()[key], weights[key] + 2.0 * up @ down)


def test_a_lora_for_another_model_is_refused_by_layer_name(tiny_model_dir, tmp_path):
    save_file({"lora_unet_add_embedding_linear_1.lora_down.weight": torch.zeros(1, 4)}, tmp_path / "xl.safetensors")
    with pytest.raises(ModelLoadError, match="'lora_unet_add_embedding_linear_1' matches no layer of this model"):
        merge_lora(LatentDiffusion.load(tiny_model_dir), tmp_path / "xl.safetensors")


def test_a_file_that_is_not_a_lora_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "notes.safetensors").write_text(json.dumps({"not": "weights"}))
    with pytest.raises(ModelLoadError, match="not a readable .safetensors file"):
        merge_lora(LatentDiffusion.load(tiny_model_dir), tmp_path / "notes.safetensors")
