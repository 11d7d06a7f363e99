"""The bundle's save/load in the diffusers StableDiffusionPipeline layout, both directions."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

import ldm.model
from ldm.errors import ConfigError
from ldm.files import OutputExists
from ldm.model import LatentDiffusion, ModelLoadError
from ldm.text import encode_prompts


def unet_output(unet, text_width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, text_width, generator=generator)
    with torch.no_grad():
        out = unet(latents, torch.tensor([250]), text)
    return out.sample if hasattr(out, "sample") else out


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0)


def test_what_we_save_loads_in_diffusers_stable_diffusion_pipeline(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "model")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert type(pipe.scheduler) is type(tiny_model.scheduler)
    torch.testing.assert_close(unet_output(pipe.unet, 8), unet_output(tiny_model.unet, 8))
    assert_same_weights(pipe.vae, tiny_model.vae)
    assert_same_weights(pipe.text_encoder, tiny_model.text_encoder)
    prompt = "a photograph of an astronaut riding a horse"
    assert pipe.tokenizer(prompt).input_ids == tiny_model.tokenizer(prompt).input_ids
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.encode_prompt(prompt, "cpu", 1, False)[0],
            encode_prompts(tiny_model.tokenizer, tiny_model.text_encoder, [prompt]),
        )


def test_what_diffusers_saves_loads_in_ours(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "ours")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.mul_(1.5)  # make sure we read diffusers' file, not our original
    pipe.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    loaded = LatentDiffusion.load(tmp_path / "theirs")
    torch.testing.assert_close(unet_output(loaded.unet, 8), unet_output(pipe.unet, 8))
    assert_same_weights(loaded.vae, pipe.vae)
    assert_same_weights(loaded.text_encoder, pipe.text_encoder)
    assert loaded.scheduler.config == pipe.scheduler.config


def test_save_and_load_round_trip_keeps_every_part(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "model")
    loaded = LatentDiffusion.load(str(tmp_path / "model"))
    for name, part in tiny_model.parts().items():
        assert_same_weights(loaded.parts()[name], part)
    assert loaded.unet.config == tiny_model.unet.config
    assert loaded.tokenizer.pad_token == tiny_model.tokenizer.pad_token
    settings = lambda scheduler: {k: v for k, v in scheduler.config.items() if not k.startswith("_")}  # noqa: E731
    assert settings(loaded.scheduler) == settings(tiny_model.scheduler)


def test_unet_weights_from_a_pytorch_bin_load_weights_only(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "model")
    unet_dir = tmp_path / "model" / "unet"
    torch.save(load_file(unet_dir / "diffusion_pytorch_model.safetensors"), unet_dir / "diffusion_pytorch_model.bin")
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    assert_same_weights(LatentDiffusion.load(tmp_path / "model").unet, tiny_model.unet)


def test_save_refuses_an_existing_folder_and_touches_nothing(tiny_model, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExists, match="already exists"):
        tiny_model.save(tmp_path / "model")
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["keep.txt"]


def test_an_interrupted_save_leaves_no_folder(tiny_model, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_model.scheduler, "save_pretrained", fail)  # the last part written
    with pytest.raises(KeyboardInterrupt):
        tiny_model.save(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_a_missing_part_is_named(tiny_model, tmp_path, part):
    tiny_model.save(tmp_path / "model")
    shutil.rmtree(tmp_path / "model" / part)
    with pytest.raises(ModelLoadError, match=f"the {part}/ part is missing"):
        LatentDiffusion.load(tmp_path / "model")


def test_unet_weights_that_do_not_fit_the_config_are_named(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "model")
    weights = tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_in.weight"] = torch.zeros(8, 9, 3, 3)  # an inpainting-sized input conv
    save_file(state, weights)
    with pytest.raises(
        ModelLoadError, match=r"unet: conv_in.weight has shape \(8, 9, 3, 3\) but the config needs \(8, 4, 3, 3\)"
    ):
        LatentDiffusion.load(tmp_path / "model")
    del state["conv_in.weight"]
    save_file(state, weights)
    with pytest.raises(ModelLoadError, match="unet: weights lack 1 key.*conv_in.weight"):
        LatentDiffusion.load(tmp_path / "model")


@pytest.mark.parametrize(
    "part, field, value, message",
    [
        (
            "vae",
            "block_out_channels",
            [8, 12],
            r"vae: decoder.conv_in.bias has shape \(16,\) but the config needs \(12,\)",
        ),
        ("vae", "layers_per_block", 2, "vae: weights lack .* key"),
        (
            "text_encoder",
            "intermediate_size",
            24,
            r"text_encoder: .*mlp.fc1.bias has shape \(16,\) but the config needs \(24,\)",
        ),
        ("text_encoder", "num_hidden_layers", 3, "text_encoder: weights lack 16 key"),
    ],
)
def test_vae_and_text_encoder_weights_that_do_not_fit_are_refused(tiny_model, tmp_path, part, field, value, message):
    tiny_model.save(tmp_path / "model")
    config_file = tmp_path / "model" / part / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), field: value}))
    with pytest.raises(ModelLoadError, match=message):
        LatentDiffusion.load(tmp_path / "model")


def test_a_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model folder"):
        LatentDiffusion.load(tmp_path)


def test_presets_build_by_name_or_path():
    model = LatentDiffusion.from_preset(ldm.model.PRESET_DIR / "tiny.yaml")
    assert model.unet.config.block_out_channels == (8, 16)
    assert model.tokenizer.vocab_size == 49408


def test_an_unknown_preset_lists_the_valid_ones():
    names = r"\['sd15', 'sd21', 'sdxl', 'sdxl-refiner', 'sdxl-refiner-tiny', 'sdxl-tiny', 'small', 'tiny'\]"
    with pytest.raises(ModelLoadError, match=rf"no preset 'sd3': use one of {names}"):
        LatentDiffusion.from_preset("sd3")


@pytest.mark.parametrize(
    "section, field, message",
    [
        ("vae", "latent_chanels", r"vae config: unknown field\(s\) \['latent_chanels'\]"),
        ("text_encoder", "hiden_size", r"text_encoder config: unknown field\(s\) \['hiden_size'\]"),
        ("unet", "cross_attention_dims", "unet config: unknown field 'cross_attention_dims'"),
    ],
)
def test_a_preset_field_typo_is_named(tmp_path, section, field, message):
    import yaml

    spec = yaml.safe_load((ldm.model.PRESET_DIR / "tiny.yaml").read_text())
    spec[section][field] = 1
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        LatentDiffusion.from_preset(tmp_path / "typo.yaml")


def test_a_tokenizer_context_longer_than_the_text_encoder_is_refused(tmp_path):
    import yaml

    spec = yaml.safe_load((ldm.model.PRESET_DIR / "tiny.yaml").read_text())
    spec["tokenizer"]["model_max_length"] = spec["text_encoder"]["max_position_embeddings"] + 1
    with pytest.raises(ConfigError, match="model_max_length=.* exceeds the text encoder's max_position_embeddings"):
        LatentDiffusion.from_spec(spec)


def test_a_shorter_tokenizer_context_survives_save_and_load(tmp_path):
    spec = ldm.model.read_preset("tiny")
    spec["tokenizer"]["model_max_length"] = 24
    LatentDiffusion.from_spec(spec).save(tmp_path / "model")
    assert LatentDiffusion.load(tmp_path / "model").tokenizer.model_max_length == 24


@pytest.mark.parametrize(
    "preset, counts",
    [  # the published sizes of SD 1.5 and SD 2.1's parts
        ("sd15", {"text_encoder": 123_060_480, "unet": 859_520_964, "vae": 83_653_863}),
        ("sd21", {"text_encoder": 340_387_840, "unet": 865_910_724, "vae": 83_653_863}),
    ],
)
def test_sd_presets_have_the_published_part_sizes(preset, counts):
    with torch.device("meta"):  # shapes only
        model = LatentDiffusion.from_preset(preset)
    assert {name: sum(p.numel() for p in part.parameters()) for name, part in model.parts().items()} == counts


def test_half_precision_files_load_in_fp32(tiny_model, tmp_path):
    for part in tiny_model.parts().values():
        part.half()  # as the shipped demo model is stored
    tiny_model.save(tmp_path / "model")
    stored = load_file(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in stored.values()} == {torch.float16}
    loaded = LatentDiffusion.load(tmp_path / "model")
    for name, part in loaded.parts().items():
        expected = tiny_model.parts()[name].state_dict()
        for key, value in part.state_dict().items():
            assert value.dtype == torch.float32, (name, key)
            assert torch.equal(value, expected[key].float()), (name, key)


def test_a_folder_loads_in_the_precision_asked_each_weight_cast_as_it_is_read(tiny_model_dir, tmp_path):
    """What a bf16 pipeline asks for: the UNet and text encoder read tensor by tensor into bf16 (the
    whole fp32 file is never held beside its copy), the VAE in fp32; the same numbers as casting after."""
    full, half = LatentDiffusion.load(tiny_model_dir), LatentDiffusion.load(tiny_model_dir, torch.bfloat16)
    for name in ("unet", "text_encoder"):
        ours, cast = getattr(half, name).state_dict(), getattr(full, name).to(torch.bfloat16).state_dict()
        assert ours.keys() == cast.keys() and all(torch.equal(ours[k], cast[k]) for k in ours), name
    assert next(half.vae.parameters()).dtype == torch.float32
    weights = {"a": torch.randn(3, 4), "ids": torch.arange(5), "empty": torch.zeros(0, 2)}
    save_file(weights, tmp_path / "w.safetensors")
    read = ldm.model.read_weights(tmp_path / "w.safetensors", torch.bfloat16)
    assert torch.equal(read["a"], weights["a"].bfloat16()) and torch.equal(read["ids"], weights["ids"])
    assert read["empty"].shape == (0, 2) and read["empty"].dtype == torch.bfloat16


def test_a_truncated_unet_file_is_one_line_in_any_precision(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ModelLoadError, match="unet: unreadable weights, truncated or damaged"):
            LatentDiffusion.load(folder, dtype)
