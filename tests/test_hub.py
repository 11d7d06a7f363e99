"""Fetching a model by hub id, against a fake hub that behaves as huggingface_hub does: it filters a
repository's file listing with the real `filter_repo_objects` (what `snapshot_download` applies to
`allow_patterns`) and materializes only what passes. The listings are shaped like the real
repositories' (stable-diffusion-v1-5, stable-diffusion-2-1, stable-diffusion-xl-base-1.0 and
-refiner-1.0: fp16 variants, .bin copies, EMA copies, ONNX and Flax files, single-file checkpoints
at the top)."""

import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file

from conftest import perturbed_tiny_model
from ldm.hub import HubError, fetch_patterns
from ldm.model import LatentDiffusion

TOKENIZER = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
TEXT = ["config.json", "model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"]
DIFFUSERS = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"]  # fmt: skip
SD15 = [
    ".gitattributes", "README.md", "model_index.json", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt",
    "v1-inference.yaml", "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
    *(f"safety_checker/{name}" for name in TEXT), *(f"text_encoder/{name}" for name in TEXT),
    *(f"tokenizer/{name}" for name in TOKENIZER), *(f"unet/{name}" for name in DIFFUSERS),
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
    *(f"vae/{name}" for name in DIFFUSERS),
]  # fmt: skip
SD21 = [name for name in SD15 if not name.startswith(("safety_checker", "v1-"))] + [
    "v2-1_768-ema-pruned.safetensors", "v2-1_768-nonema-pruned.ckpt",
]  # fmt: skip
XL_EXTRAS = ["model.onnx", "model.onnx_data", "flax_model.msgpack", "openvino_model.bin", "openvino_model.xml"]
SDXL = [
    "model_index.json", "sd_xl_base_1.0.safetensors", "sd_xl_offset_example-lora_1.0.safetensors", "01.png",
    "scheduler/scheduler_config.json",
    *(f"{part}/{name}" for part in ("text_encoder", "text_encoder_2") for name in TEXT[:3] + XL_EXTRAS),
    *(f"{part}/{name}" for part in ("tokenizer", "tokenizer_2") for name in TOKENIZER),
    *(f"unet/{name}" for name in DIFFUSERS[:3] + XL_EXTRAS),
    *(f"{part}/{name}" for part in ("vae", "vae_1_0", "vae_decoder") for name in DIFFUSERS[:3]),
]  # fmt: skip
REFINER = [name for name in SDXL if name.split("/")[0] not in ("text_encoder", "tokenizer", "vae_decoder")]
REFINER = [name.replace("sd_xl_base", "sd_xl_refiner") for name in REFINER]

SD_INDEX = {part: ["x", "y"] for part in ("text_encoder", "tokenizer", "unet", "vae", "scheduler", "safety_checker")}
XL_INDEX = {part: ["x", "y"] for part in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "unet", "vae",
                                          "scheduler")}  # fmt: skip
REFINER_INDEX = XL_INDEX | {"text_encoder": [None, None], "tokenizer": [None, None]}
COMMON = {"model_index.json", "sampling.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
          "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"}  # fmt: skip
TEXT_FILES = {"text_encoder/config.json", "text_encoder/model.safetensors", *(f"tokenizer/{n}" for n in TOKENIZER)}
SECOND = {name.replace("text_encoder/", "text_encoder_2/").replace("tokenizer/", "tokenizer_2/") for name in TEXT_FILES}


class FakeHub:
    """snapshot_download and list_repo_files over one repository: a listing, with the bytes of the
    files a real model folder has (the others are stand-ins)."""

    def __init__(self, listing: list[str], content: Path | None, cache: Path):
        self.content, self.cache, self.fetched = content, cache, set()
        self.listing = sorted(set(listing) | ({str(p.relative_to(content)) for p in content.rglob("*") if p.is_file()}
                                              if content else set()))  # fmt: skip

    def snapshot_download(self, repo_id, allow_patterns=None, **_):
        for name in filter_repo_objects(self.listing, allow_patterns=allow_patterns):
            target = self.cache / name
            target.parent.mkdir(parents=True, exist_ok=True)
            source = self.content / name if self.content else None
            if source and source.is_file():
                shutil.copy(source, target)
            else:  # a file our model folders lack (special_tokens_map.json) or that must not be read
                target.write_text("{}" if name.endswith(".json") else "a file the loader must not read")
            self.fetched.add(name)
        return str(self.cache)

    def list_repo_files(self, repo_id, **_):
        return list(self.listing)

    def install(self, monkeypatch):
        monkeypatch.setattr("huggingface_hub.snapshot_download", self.snapshot_download)
        monkeypatch.setattr("huggingface_hub.list_repo_files", self.list_repo_files)
        return self


def fetched(index: dict, listing: list[str]) -> set[str]:
    patterns = fetch_patterns(index, listing, extra=("sampling.json",))
    return set(filter_repo_objects(listing + ["sampling.json"], allow_patterns=patterns))


@pytest.mark.parametrize(
    "listing, index, expected",
    [
        (SD15, SD_INDEX, COMMON | TEXT_FILES),
        (SD21, SD_INDEX | {"safety_checker": [None, None]}, COMMON | TEXT_FILES),
        (SDXL, XL_INDEX, COMMON | TEXT_FILES | SECOND),
        (REFINER, REFINER_INDEX, COMMON | SECOND),
    ],
    ids=["sd15", "sd21", "sdxl-base", "sdxl-refiner"],
)
def test_each_repository_shape_fetches_its_parts_once_and_nothing_else(listing, index, expected):
    assert fetched(index, listing) == expected


def test_a_part_with_only_bin_weights_fetches_the_bin():
    listing = [name for name in SD15 if not (name.startswith("unet/") and name.endswith(".safetensors"))]
    got = fetched(SD_INDEX, listing)
    assert "unet/diffusion_pytorch_model.bin" in got and "unet/diffusion_pytorch_model.fp16.bin" not in got


def test_sharded_weights_fetch_their_shards():
    listing = SDXL + ["text_encoder_2/model.safetensors.index.json", "text_encoder_2/model-00001-of-00002.safetensors",
                      "text_encoder_2/model-00002-of-00002.safetensors"]  # fmt: skip
    listing.remove("text_encoder_2/model.safetensors")
    got = fetched(XL_INDEX, listing)
    assert {"text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json"} <= got


def test_a_part_with_only_an_fp16_variant_is_refused_in_one_line():
    listing = [name for name in SD15 if name not in ("vae/diffusion_pytorch_model.safetensors",
                                                     "vae/diffusion_pytorch_model.bin")]  # fmt: skip
    with pytest.raises(HubError, match="vae/ has no diffusion_pytorch_model.safetensors"):
        fetch_patterns(SD_INDEX, listing)


def test_an_sdxl_hub_id_downloads_and_loads(tiny_sdxl_dir, tmp_path, monkeypatch):
    hub = FakeHub(SDXL, tiny_sdxl_dir, tmp_path / "cache").install(monkeypatch)
    loaded = LatentDiffusion.load("stabilityai/stable-diffusion-xl-base-1.0")
    assert loaded.is_sdxl and not loaded.is_refiner
    assert not any(name.endswith((".fp16.safetensors", ".onnx", ".msgpack")) for name in hub.fetched)
    expected = load_file(tiny_sdxl_dir / "text_encoder_2" / "model.safetensors")
    assert torch.equal(loaded.text_encoder_2.state_dict()["text_projection.weight"], expected["text_projection.weight"])


def test_an_sdxl_refiner_hub_id_downloads_and_loads(tmp_path, monkeypatch):
    perturbed_tiny_model("sdxl-refiner-tiny").save(tmp_path / "refiner")
    FakeHub(REFINER, tmp_path / "refiner", tmp_path / "cache").install(monkeypatch)
    assert LatentDiffusion.load("stabilityai/stable-diffusion-xl-refiner-1.0").is_refiner


def test_an_sd_hub_id_with_a_bin_only_unet_loads(tiny_model, tmp_path, monkeypatch):
    tiny_model.save(tmp_path / "model")
    unet = tmp_path / "model" / "unet"
    torch.save(load_file(unet / "diffusion_pytorch_model.safetensors"), unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    listing = [name for name in SD15 if not (name.startswith("unet/") and name.endswith(".safetensors"))]
    FakeHub(listing, tmp_path / "model", tmp_path / "cache").install(monkeypatch)
    loaded = LatentDiffusion.load("someone/tiny-sd")
    assert all(torch.equal(v, tiny_model.unet.state_dict()[k]) for k, v in loaded.unet.state_dict().items())


def test_an_unreachable_hub_id_is_one_clear_error(monkeypatch):
    def offline(repo_id, allow_patterns=None, **_):
        raise OSError("network is unreachable")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(HubError, match="'someone/missing' is not a model folder, and the hub could not provide it"):
        LatentDiffusion.load("someone/missing")


def test_a_repository_without_model_index_is_refused(tmp_path, monkeypatch):
    FakeHub(["README.md", "model.safetensors"], None, tmp_path / "cache").install(monkeypatch)
    with pytest.raises(HubError, match="no model_index.json"):
        LatentDiffusion.load("someone/not-diffusers")
