"""Aspect-ratio buckets: the table of sizes, where each image goes, batches that never mix
buckets, and a sampler that resumes where it stopped."""

import math

import pytest
import torch
from PIL import Image, ImageDraw
from training.conftest import recipe, run_until

from ldm.data.buckets import BucketBatchSampler, assign, bucket_sizes, table
from ldm.train.config import load_config
from ldm.train.loop import Trainer


def test_buckets_are_multiples_of_the_step_within_the_area_and_both_ways():
    sizes = bucket_sizes(512, 64)
    assert (512, 512) in sizes and (1024, 256) in sizes and (256, 1024) in sizes
    for width, height in sizes:
        assert width % 64 == 0 and height % 64 == 0 and width * height <= 512 * 512
        assert 256 <= min(width, height) and max(width, height) <= 1024 and (height, width) in sizes


def test_an_image_goes_to_the_nearest_ratio_and_a_small_one_is_not_upscaled():
    sizes = bucket_sizes(512, 64)
    width, height = assign((2048, 1024), sizes, 64, upscale=False)
    assert (width, height) in sizes and abs(math.log(width / height) - math.log(2)) < 0.15
    assert assign((1024, 1024), sizes, 64, upscale=False) == (512, 512)
    assert assign((200, 100), sizes, 64, upscale=False) == (192, 64)  # its own size, rounded down
    assert assign((200, 100), sizes, 64, upscale=True) in sizes
    assert table([(512, 512), (704, 320), (512, 512)]) == "512x512: 2, 704x320: 1"


def test_batches_never_mix_buckets_cover_every_image_and_resume_where_they_stopped():
    sizes = [(64, 64)] * 7 + [(96, 32)] * 5 + [(32, 96)] * 3
    stream = iter(BucketBatchSampler(sizes, batch_size=2, seed=3))
    epoch = [next(stream) for _ in range(4 + 3 + 2)]  # 9 batches an epoch
    assert all(len({sizes[i] for _, i in batch}) == 1 for batch in epoch)
    assert sorted(i for batch in epoch for _, i in batch) == list(range(15)) and {e for b in epoch for e, _ in b} == {0}
    resumed = iter(BucketBatchSampler(sizes, batch_size=2, seed=3, skip=5))
    assert [next(resumed) for _ in range(4)] == epoch[5:]
    ranks = [iter(BucketBatchSampler(sizes, 2, 3, rank, 2)) for rank in (0, 1)]
    shares = [[next(ranks[0]) for _ in range(5)], [next(ranks[1]) for _ in range(4)]]
    assert sorted(i for share in shares for batch in share for _, i in batch) == list(range(15))


@pytest.fixture(scope="module")
def mixed_shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    for i, (width, height) in enumerate([(64, 32), (32, 64), (48, 48), (96, 40), (40, 96), (32, 32)] * 2):
        image = Image.new("RGB", (width, height))
        ImageDraw.Draw(image).ellipse([width // 4, height // 4, 3 * width // 4, 3 * height // 4], fill=(255, 0, 0))
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text("a red circle")
    return folder


def test_a_bucketed_run_trains_and_resumes_exactly(mixed_shapes, tmp_path, monkeypatch):
    options = ["data.resolution=32", "data.buckets=true", "data.bucket_step=16", "steps.batch_size=2"]
    whole = Trainer(load_config(recipe(tmp_path / "whole", mixed_shapes, steps={"max": 8}), options))
    whole.run()
    assert sorted(set(whole.dataset.sizes)) == [(16, 48), (32, 32), (48, 16)]
    path = recipe(tmp_path / "split", mixed_shapes, steps={"max": 8}, checkpoint={"every": 4})
    run_until(monkeypatch, load_config(path, options), 4)
    second = Trainer(load_config(path, [*options, "checkpoint.resume=latest"]))
    second.run()
    assert second.losses == pytest.approx(whole.losses[4:], abs=1e-6)
    expected = whole.model.unet.state_dict()
    for key, value in second.model.unet.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0)


def test_latents_are_cached_per_bucket(mixed_shapes, tmp_path):
    options = ["data.resolution=32", "data.buckets=true", "data.bucket_step=16", "steps.batch_size=2",
               "data.cache_latents=true", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    trainer = Trainer(load_config(recipe(tmp_path, mixed_shapes, steps={"max": 4}), options))
    trainer.run()
    cached = trainer.dataset
    assert {name for name in cached.tensors if name.startswith("latent_mean")} == {
        "latent_mean@16x48", "latent_mean@32x32", "latent_mean@48x16",
    }  # fmt: skip
    factor = 2 ** (len(trainer.model.vae.config.block_out_channels) - 1)
    for index, (width, height) in enumerate(cached.sizes):
        assert cached[(0, index)]["latent_mean"].shape[-2:] == (height // factor, width // factor)
    assert cached[(0, 0)]["text"].shape == (77, 8)
