"""Original single-file checkpoints: our export, diffusers' reading of it, and our reading back."""

import pickle

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from conftest import perturbed_tiny_model
from ldm.files import OutputExists
from ldm.model import LatentDiffusion, ModelLoadError, read_preset
from ldm.single_file import load_single_file, save_single_file


def assert_same_parts(a: LatentDiffusion, b) -> None:
    for name, part in a.parts().items():
        expected, got = part.state_dict(), getattr(b, name).state_dict()
        assert expected.keys() == got.keys(), name
        for key in expected:
            assert torch.equal(expected[key], got[key]), key


@pytest.fixture
def openclip_preset(tmp_path):
    """tiny, in SD 2.x's shape: OpenCLIP text encoder (gelu), linear projections."""
    spec = read_preset("tiny")
    spec["text_encoder"]["hidden_act"] = "gelu"
    spec["unet"]["use_linear_projection"] = True
    path = tmp_path / "tiny-sd2.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_export_uses_the_original_key_names(tiny_model, tmp_path):
    save_single_file(tiny_model, tmp_path / "model.safetensors")
    keys = set(load_file(tmp_path / "model.safetensors"))
    for key in [
        "model.diffusion_model.input_blocks.0.0.weight",  # conv_in
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",  # cross-attention
        "model.diffusion_model.input_blocks.2.0.op.weight",  # the downsampler
        "model.diffusion_model.middle_block.0.in_layers.0.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # the upsampler of a block without attention
        "model.diffusion_model.out.2.bias",
        "first_stage_model.encoder.down.0.block.0.norm1.weight",
        "first_stage_model.decoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ]:
        assert key in keys, key


def test_round_trip_gives_identical_weights(tiny_model, tmp_path):
    save_single_file(tiny_model, tmp_path / "model.safetensors")
    assert_same_parts(tiny_model, load_single_file(tmp_path / "model.safetensors", preset="tiny"))


def test_round_trip_with_an_openclip_text_encoder(openclip_preset, tmp_path):
    model = LatentDiffusion.from_preset(openclip_preset)
    save_single_file(model, tmp_path / "model.safetensors")
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in load_file(
        tmp_path / "model.safetensors"
    )
    assert_same_parts(model, load_single_file(tmp_path / "model.safetensors", preset=openclip_preset))


def test_diffusers_single_file_loader_reads_our_export(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "config")  # diffusers takes the architecture from a folder
    save_single_file(tiny_model, tmp_path / "model.safetensors")
    pipe = StableDiffusionPipeline.from_single_file(
        tmp_path / "model.safetensors", config=str(tmp_path / "config"), local_files_only=True
    )
    assert_same_parts(tiny_model, pipe)


def test_sdxl_export_uses_generative_models_names_and_reads_back_here_and_in_diffusers(tiny_sdxl_dir, tmp_path):
    """SDXL's original layout: the UNet's added conditioning as label_emb, the two text encoders as
    conditioner.embedders.0 (transformers' names) and .1 (OpenCLIP's, fused q/k/v, the projection
    transposed). diffusers' from_single_file (0.42.1, single_file_utils.py) reads it as we do."""
    model = LatentDiffusion.load(tiny_sdxl_dir)
    save_single_file(model, tmp_path / "sdxl.safetensors")
    keys = set(load_file(tmp_path / "sdxl.safetensors"))
    for key in [
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight",  # the second of two
        "model.diffusion_model.output_blocks.1.2.conv.weight",  # the upsampler after a transformer
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
    ]:
        assert key in keys, key
    assert_same_parts(model, load_single_file(tmp_path / "sdxl.safetensors", preset="sdxl-tiny"))
    pipe = StableDiffusionXLPipeline.from_single_file(
        tmp_path / "sdxl.safetensors", config=str(tiny_sdxl_dir), local_files_only=True
    )
    assert_same_parts(model, pipe)


def test_ckpt_files_load_weights_only(tiny_model, tmp_path):
    save_single_file(tiny_model, tmp_path / "model.safetensors")
    torch.save({"state_dict": load_file(tmp_path / "model.safetensors"), "global_step": 10}, tmp_path / "model.ckpt")
    assert_same_parts(tiny_model, load_single_file(tmp_path / "model.ckpt", preset="tiny"))


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_a_ckpt_holding_code_is_refused(tmp_path):
    with (tmp_path / "evil.ckpt").open("wb") as file:
        pickle.dump({"state_dict": Payload()}, file, protocol=2)
    with pytest.raises(ModelLoadError, match="cannot be loaded weights-only"):
        load_single_file(tmp_path / "evil.ckpt")


def test_a_file_that_is_not_a_sd_checkpoint_is_refused(tmp_path):
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError, match="no model.diffusion_model.\\* weights"):
        load_single_file(tmp_path / "other.safetensors")
    save_file({"model.diffusion_model.x": torch.zeros(2)}, tmp_path / "part.safetensors")
    with pytest.raises(ModelLoadError, match="no model.diffusion_model.input_blocks.0.0.weight: not a whole"):
        load_single_file(tmp_path / "part.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="not a readable checkpoint"):
        load_single_file(tmp_path / "broken.safetensors")


def test_export_refuses_to_overwrite(tiny_model, tmp_path):
    (tmp_path / "model.safetensors").write_text("mine")
    with pytest.raises(OutputExists):
        save_single_file(tiny_model, tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors").read_text() == "mine"


def test_weights_that_do_not_fit_the_preset_are_named(tiny_model, tmp_path):
    save_single_file(tiny_model, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="unet: weights lack 118 key.*down_blocks.1.attentions.0"):
        load_single_file(tmp_path / "model.safetensors", preset="small")


def test_an_sdxl_refiner_file_reads_back_here_and_in_diffusers(tmp_path):
    """The refiner's original layout: OpenCLIP bigG alone as conditioner.embedders.0.model, the
    added conditioning (5 ids) as label_emb. diffusers 0.42.1 reads it as an "xl_refiner"."""
    refiner = perturbed_tiny_model("sdxl-refiner-tiny")
    refiner.save(tmp_path / "folder")
    save_single_file(refiner, tmp_path / "refiner.safetensors")
    keys = set(load_file(tmp_path / "refiner.safetensors"))
    assert "conditioner.embedders.0.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "conditioner.embedders.0.model.text_projection" in keys
    assert not any(key.startswith(("conditioner.embedders.1.", "cond_stage_model.")) for key in keys)
    back = load_single_file(tmp_path / "refiner.safetensors", preset="sdxl-refiner-tiny")
    assert back.is_refiner and not back.force_zeros_for_empty_prompt
    assert_same_parts(refiner, back)
    pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(
        tmp_path / "refiner.safetensors", config=str(tmp_path / "folder"), local_files_only=True
    )
    assert pipe.text_encoder is None
    assert_same_parts(refiner, pipe)
    with pytest.raises(ModelLoadError, match="an SDXL refiner; the preset 'sdxl-tiny' does not fit it"):
        load_single_file(tmp_path / "refiner.safetensors", preset="sdxl-tiny")


def test_a_file_loads_into_weights_built_on_the_meta_device_in_its_own_precision(tiny_sdxl_dir, tmp_path, monkeypatch):
    """No random weights are made first (they would double SDXL's memory): every initialiser runs on
    meta tensors, and the parts keep the file's fp16, for the pipeline to cast once to its own."""
    model = LatentDiffusion.load(tiny_sdxl_dir)
    for part in model.parts().values():
        part.half()
    save_single_file(model, tmp_path / "model.safetensors")
    initialised = []
    for name in ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "ones_", "zeros_"):
        init = getattr(torch.nn.init, name)
        monkeypatch.setattr(
            torch.nn.init, name, lambda t, *a, _init=init, **k: initialised.append(t.device.type) or _init(t, *a, **k)
        )
    loaded = load_single_file(tmp_path / "model.safetensors")
    assert initialised and set(initialised) == {"meta"}
    assert {p.dtype for part in loaded.parts().values() for p in part.parameters()} == {torch.float16}
    assert not any(t.is_meta for part in loaded.parts().values() for t in [*part.parameters(), *part.buffers()])
    assert_same_parts(loaded, model)
