"""Caption options kohya users expect: tag shuffling with keep_tokens, a caption file extension."""

import torch
from PIL import Image
from training.conftest import recipe

import train
from ldm.data.captions import shuffle_tags
from ldm.data.datasets import ImageOptions, open_dataset


def test_tags_after_keep_tokens_are_shuffled_and_the_kept_ones_stay_first():
    caption = "sks dog, a photo, on grass, sunny, wide angle, smiling"
    torch.manual_seed(0)
    draws = [shuffle_tags(caption, keep_tokens=2) for _ in range(20)]
    assert all(d.startswith("sks dog, a photo, ") for d in draws)
    assert all(sorted(d.split(", ")) == sorted(caption.split(", ")) for d in draws)
    assert len(set(draws)) > 5  # the order changes from step to step
    torch.manual_seed(0)
    assert [shuffle_tags(caption, keep_tokens=2) for _ in range(20)] == draws  # the seed fixes it


def test_a_caption_extension_names_the_caption_files(tmp_path):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("red, square")
    (tmp_path / "a.txt").write_text("not this one")
    dataset = open_dataset(tmp_path, ImageOptions(16), caption_extension=".caption")
    assert dataset[(0, 0)]["caption"] == "red, square"


def test_shuffled_tags_cannot_use_cached_text_embeddings(tmp_path, capsys):
    path = recipe(tmp_path, tmp_path)
    assert train.main(["--config", str(path), "data.shuffle_tags=true", "data.cache_latents=true"]) == 2
    assert "data.shuffle_tags=true: the captions change every step" in capsys.readouterr().err
    assert train.main(["--config", str(path), "data.caption_extension=txt"]) == 2
    assert "data.caption_extension='txt': starts with a dot" in capsys.readouterr().err
