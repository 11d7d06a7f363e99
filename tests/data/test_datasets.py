"""The three dataset formats, the image transforms, and bad items skipped, never fatal."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.datasets import (
    CaptionedImages,
    DatasetError,
    EpochSampler,
    ImageOptions,
    Skipped,
    TarShards,
    check_usable,
    collate,
    open_dataset,
)
from ldm.data.transforms import BadItem, Placement, prepare_image, to_rgb

OPTIONS = ImageOptions(resolution=8)


def png(colour=(255, 0, 0), size=(12, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def items(dataset) -> list:
    """Every item, those set aside up front (unreadable headers) first, as Skipped records."""
    if isinstance(dataset, CaptionedImages):
        found = [Skipped(source, reason) for source, reason in dataset.skipped.items()]
        return found + [dataset[(0, i)] for i in range(len(dataset))]
    return list(dataset.one_pass())


def test_a_folder_of_images_with_same_stem_captions_searched_recursively(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.png").write_bytes(png())
    (tmp_path / "a" / "one.txt").write_text("a red square\n")
    (tmp_path / "two.JPG").write_bytes(png())  # any case of a known suffix
    (tmp_path / "two.txt").write_text("another")
    dataset = open_dataset(tmp_path, OPTIONS)
    assert isinstance(dataset, CaptionedImages) and len(dataset) == 2
    first = items(dataset)[0]
    assert first["caption"] == "a red square" and first["pixels"].shape == (3, 8, 8)


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_metadata_file_with_a_configurable_caption_column(tmp_path, kind):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(png())
    if kind == "jsonl":
        (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "images/x.png", "prompt": "a cat"}) + "\n")
    else:
        (tmp_path / "metadata.csv").write_text('file_name,prompt\nimages/x.png,"a cat, sleeping"\n')
    dataset = open_dataset(tmp_path, OPTIONS, caption_column="prompt")
    assert items(dataset)[0]["caption"] == ("a cat" if kind == "jsonl" else "a cat, sleeping")
    with pytest.raises(DatasetError, match="no caption column 'text'"):
        open_dataset(tmp_path, OPTIONS)


def write_shard(path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for suffix, data in files.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_with_txt_or_json_captions(tmp_path):
    write_shard(
        tmp_path / "000.tar", {"a": {"png": png(), "txt": b"red"}, "b": {"jpg": png(), "json": b'{"text": "blue"}'}}
    )
    write_shard(tmp_path / "001.tar", {"c": {"webp": png(), "txt": b"green"}})
    dataset = open_dataset(tmp_path, OPTIONS)
    assert isinstance(dataset, TarShards)
    assert [item["caption"] for item in items(dataset)] == ["red", "blue", "green"]
    # Two processes read different shards, and together every shard.
    firsts = [next(iter(TarShards(dataset.shards, OPTIONS, "text", rank, 2)))["caption"] for rank in (0, 1)]
    assert firsts == ["red", "green"]


def test_bad_items_are_skipped_with_their_reason(tmp_path):
    good = png()
    files = {
        "good": (good, "fine"),
        "corrupt": (b"\x89PNG not really", "x"),
        "truncated": (good[: len(good) // 2], "x"),
        "empty": (b"", "x"),
        "small": (png(size=(4, 4)), "x"),
        "no_caption": (good, None),
        "blank_caption": (good, "  \n"),
    }
    for name, (data, caption) in files.items():
        (tmp_path / f"{name}.png").write_bytes(data)
        if caption is not None:
            (tmp_path / f"{name}.txt").write_text(caption)
    (tmp_path / "bad_text.png").write_bytes(good)
    (tmp_path / "bad_text.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    results = {name_of(item): item for item in items(open_dataset(tmp_path, OPTIONS))}
    assert results["good"]["caption"] == "fine"
    reasons = {name: item.reason for name, item in results.items() if isinstance(item, Skipped)}
    assert reasons["corrupt"].startswith("unreadable image")
    assert reasons["truncated"].startswith("unreadable image")
    assert reasons["empty"].startswith("unreadable image")
    assert reasons["small"] == "4x4 is smaller than the training resolution 8"
    assert reasons["no_caption"] == "no caption file (no_caption.txt)"
    assert reasons["blank_caption"] == "no caption"
    assert reasons["bad_text"].startswith("unreadable caption (bad_text.txt: UnicodeDecodeError)")


def name_of(item) -> str:
    source = item.source if isinstance(item, Skipped) else None
    return source.rsplit("/", 1)[-1].removesuffix(".png") if source else "good"


def test_collate_sets_skipped_items_aside():
    good = {"pixels": torch.zeros(3, 8, 8), "caption": "a"}
    batch = collate([good, Skipped("x.png", "no caption"), good])
    assert batch["pixels"].shape == (2, 3, 8, 8) and batch["captions"] == ["a", "a"]
    assert batch["skipped"] == [Skipped("x.png", "no caption")]


def test_a_dataset_without_a_usable_item_stops_with_the_reasons(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.png").write_bytes(png())
    with pytest.raises(DatasetError, match="no usable item among 2: 1 unreadable image, 1 no caption file"):
        check_usable(open_dataset(tmp_path, OPTIONS))


def test_an_empty_folder_says_what_it_looked_for(tmp_path):
    with pytest.raises(DatasetError, match="no images .*, metadata file or .tar shards"):
        open_dataset(tmp_path, OPTIONS)


def test_the_sampler_deals_each_epoch_to_processes_and_resumes_mid_stream():
    first_epoch = lambda sampler: [next(it) for it in [iter(sampler)] for _ in range(5)]  # noqa: E731
    rank0, rank1 = first_epoch(EpochSampler(10, seed=3, rank=0, world=2)), first_epoch(EpochSampler(10, 3, 1, 2))
    assert {e for e, _ in rank0 + rank1} == {0}
    assert sorted(i for _, i in rank0 + rank1) == list(range(10))  # disjoint, together everything
    stream = iter(EpochSampler(10, seed=3))
    whole = [next(stream) for _ in range(17)]
    resumed = iter(EpochSampler(10, seed=3, skip=12))
    assert [next(resumed) for _ in range(5)] == whole[12:]


@pytest.mark.parametrize(
    "mode, make",
    [
        ("RGBA", lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 0))),  # fully transparent red: white
        ("LA", lambda: Image.new("LA", (8, 8), (0, 0))),
        ("P", lambda: transparent_palette_image()),
        ("CMYK", lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 0))),  # no ink: white
        ("I;16", lambda: Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))),
        ("L", lambda: Image.new("L", (8, 8), 255)),
    ],
)
def test_every_mode_becomes_rgb_with_transparency_on_white(mode, make):
    image = make()
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.getpixel((4, 4)) == (255, 255, 255)


def transparent_palette_image() -> Image.Image:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    return image


def test_resize_by_the_shorter_side_then_center_crop_and_scale_to_plus_minus_one():
    image = Image.new("RGB", (40, 20))
    image.paste((255, 255, 255), (0, 0, 6, 20))  # a white band on the left that the centre crop drops
    pixels, _ = prepare_image(image, (10, 10), center_crop=True, random_flip=False, rng=np.random.default_rng(0))
    assert pixels.shape == (3, 10, 10)
    assert pixels.min() == -1 and pixels.max() < -0.9


def test_random_crop_and_flip_depend_only_on_the_item_seed():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    crop = lambda seed: prepare_image(image, (16, 16), False, True, np.random.default_rng(seed))[0]  # noqa: E731
    assert torch.equal(crop(1), crop(1))
    assert any(not torch.equal(crop(1), crop(s)) for s in range(2, 6))
    with pytest.raises(BadItem):
        prepare_image(image, (32, 32), True, False, np.random.default_rng(0))


def test_boxes_follow_the_resize_crop_and_flip():
    placement = Placement(10, 10, 0.5, left=5, top=0, flip=False, original=(40, 20), scaled=(20, 10))  # centre crop
    assert placement.box((10, 0, 20, 10)) == (0.0, 0.0, 0.5, 0.5)
    assert placement.box((0, 0, 8, 20)) is None  # cropped away
    assert placement.box((26, 10, 60, 20)) == (0.8, 0.5, 1.0, 1.0)  # clipped to the square
    mirrored = Placement(10, 10, 0.5, 5, 0, True, (40, 20), (20, 10))
    assert mirrored.box((10, 0, 20, 10)) == (0.5, 0.0, 1.0, 0.5)
    image = Image.new("RGB", (40, 20))
    assert prepare_image(image, (10, 10), True, False, np.random.default_rng(0))[1] == placement


def test_size_ids_record_the_original_size_the_crop_and_the_target_as_sdxl_trains():
    """(original h, w, crop top, left, target h, w); a mirrored crop counts from its new left edge."""
    image = Image.new("RGB", (90, 30))  # scaled to 30x10, a 10x10 crop
    rng = np.random.default_rng(3)
    _, placement = prepare_image(image, (10, 10), False, False, rng)
    assert placement.size_ids() == (30, 90, 0, placement.left, 10, 10) and 0 <= placement.left <= 20
    flipped = Placement(10, 10, 1 / 3, left=4, top=0, flip=True, original=(90, 30), scaled=(30, 10))
    assert flipped.size_ids() == (30, 90, 0, 16, 10, 10)
    _, wide = prepare_image(Image.new("RGB", (64, 48)), (32, 16), True, False, rng)  # a 2:1 bucket
    assert wide.size_ids() == (48, 64, 4, 0, 16, 32)


def test_boxes_beside_the_images_come_with_the_items_and_bad_ones_are_skipped(tmp_path):
    for name in ("boxed", "plain", "bad"):
        (tmp_path / f"{name}.png").write_bytes(png(size=(8, 8)))
        (tmp_path / f"{name}.txt").write_text("a red circle")
    (tmp_path / "boxed.boxes.json").write_text(json.dumps({"red": [[0, 0, 4, 2]], "circle": [[0, 0, 4, 2]]}))
    (tmp_path / "bad.boxes.json").write_text(json.dumps({"red": [[0, 0, 4]]}))
    bad, boxed, plain = items(open_dataset(tmp_path, OPTIONS))  # sorted by name
    assert bad.reason.startswith("unreadable boxes (ValueError")
    assert boxed["boxes"] == [["red", 0.0, 0.0, 0.5, 0.25], ["circle", 0.0, 0.0, 0.5, 0.25]]
    assert "boxes" not in plain
    assert collate([boxed, plain])["boxes"] == [boxed["boxes"], None]
    assert "boxes" not in collate([plain])


def test_boxes_in_webdataset_shards(tmp_path):
    boxes = b'{"cat": [[4, 4, 8, 8]]}'
    write_shard(tmp_path / "0.tar", {"a": {"png": png(size=(8, 8)), "txt": b"a cat", "boxes.json": boxes}})
    (item,) = items(open_dataset(tmp_path, OPTIONS))
    assert item["boxes"] == [["cat", 0.5, 0.5, 1.0, 1.0]]


def test_an_image_too_large_to_decode_is_set_aside_before_training(tmp_path, monkeypatch):
    """Over MAX_IMAGE_PIXELS (89 M by default; lowered to 100 here so that small images stand for
    large ones): PIL raises past twice the limit (16x16) and only warns below that (12x12); both
    are set aside, with their size."""
    for name, size in (("huge", (16, 16)), ("large", (12, 12)), ("fine", (8, 8))):
        (tmp_path / f"{name}.png").write_bytes(png(size=size))
        (tmp_path / f"{name}.txt").write_text("x")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    dataset = open_dataset(tmp_path, OPTIONS)
    assert [image.name for image, _ in dataset.entries] == ["fine.png"]
    assert dataset.skipped[str(tmp_path / "huge.png")] == "image too large (256 pixels, more than the 100 decoded here)"
    assert dataset.skipped[str(tmp_path / "large.png")] == (
        "image too large (12x12 = 144 pixels, more than the 100 decoded here)"
    )


def test_bad_metadata_lines_are_skipped_and_named_by_line(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    lines = ['{"file_name": "a.png", "text": "fine"}', "{not json", "[1, 2]", "", '{"text": "no file"}']
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    dataset = open_dataset(tmp_path, OPTIONS)
    assert dataset.entries == [(tmp_path / "a.png", "fine")]
    file = tmp_path / "metadata.jsonl"
    assert sorted(dataset.skipped) == [f"{file}:2", f"{file}:3", f"{file}:5"]
    assert dataset.skipped[f"{file}:2"].startswith("not a JSON line")


MASKED = ImageOptions(resolution=8, masks=True)


def rgba_png(alpha: np.ndarray) -> bytes:
    """A red image whose alpha channel is `alpha` (H, W) in 0..255."""
    array = np.zeros((*alpha.shape, 4), dtype=np.uint8)
    array[..., 0], array[..., 3] = 255, alpha
    buffer = io.BytesIO()
    Image.fromarray(array, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_loss_mask_is_the_mask_file_else_the_alpha_channel_else_ones(tmp_path):
    """The masked loss's sources, as kohya reads them (alpha_mask, or a conditioning image's grey)."""
    left_half = np.zeros((16, 16), dtype=np.uint8)
    left_half[:, :8] = 255
    (tmp_path / "alpha.png").write_bytes(rgba_png(left_half))
    (tmp_path / "file.png").write_bytes(rgba_png(left_half))  # its mask file wins over its alpha
    Image.new("L", (16, 16), 64).save(tmp_path / "file_mask.png")
    (tmp_path / "plain.png").write_bytes(png(size=(16, 16)))
    Image.new("L", (8, 8)).save(tmp_path / "wrong_mask.png")
    (tmp_path / "wrong.png").write_bytes(png(size=(16, 16)))
    for name in ("alpha", "file", "plain", "wrong"):
        (tmp_path / f"{name}.txt").write_text("a red square")
    dataset = open_dataset(tmp_path, MASKED)
    assert [image.name for image, _ in dataset.entries] == ["alpha.png", "file.png", "plain.png", "wrong.png"]
    alpha, file, plain, wrong = items(dataset)
    expected = torch.zeros(1, 8, 8)
    expected[..., :4] = 1
    torch.testing.assert_close(alpha["mask"], expected)
    torch.testing.assert_close(file["mask"], torch.full((1, 8, 8), 64 / 255))
    assert torch.equal(plain["mask"], torch.ones(1, 8, 8))
    assert wrong.reason == "the mask is 8x8, the image 16x16"
    assert "mask" not in items(open_dataset(tmp_path, OPTIONS))[0]  # only when the masked loss asks
    assert collate([alpha, plain])["mask"].shape == (2, 1, 8, 8)


def test_a_mask_follows_the_resize_crop_and_flip(tmp_path):
    """The same crop and mirror as the pixels: the alpha's opaque column lands where the red one does."""
    alpha = np.zeros((20, 30), dtype=np.uint8)
    alpha[:, 4:10] = 255
    (tmp_path / "a.png").write_bytes(rgba_png(alpha))
    (tmp_path / "a.txt").write_text("x")
    options = ImageOptions(resolution=20, center_crop=False, random_flip=True, masks=True)
    dataset = open_dataset(tmp_path, options)
    for epoch in range(6):
        item = dataset[(epoch, 0)]
        red = (item["pixels"][0] > 0).float()  # red where opaque: composited on white elsewhere, so also > 0
        opaque = item["mask"][0] > 0.5
        green = item["pixels"][1] < 0  # white (transparent) has green; opaque red has none
        assert torch.equal(opaque, green) and red.all()


def test_masks_in_webdataset_shards(tmp_path):
    mask = io.BytesIO()
    Image.new("L", (8, 8), 255).save(mask, format="PNG")
    write_shard(tmp_path / "0.tar", {"a": {"png": png(size=(8, 8)), "txt": b"a cat", "mask.png": mask.getvalue()}})
    (item,) = items(open_dataset(tmp_path, MASKED))
    assert torch.equal(item["mask"], torch.ones(1, 8, 8))


CONTROLLED = ImageOptions(resolution=8, controls=True)


def test_a_control_image_is_name_control_png_or_the_conditioning_image_column_and_never_an_image(tmp_path):
    """A ControlNet's sources: NAME_control.png beside NAME.png, or the `conditioning_image` column of a
    metadata file (the column diffusers' examples/controlnet/train_controlnet.py reads by default);
    in [0, 1]; an image without one is skipped, saying so."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.png").write_bytes(png(size=(16, 16)))
        (folder / f"{name}.txt").write_text("a red square")
    Image.new("RGB", (16, 16), (255, 128, 0)).save(folder / "a_control.png")
    dataset = open_dataset(folder, CONTROLLED)
    assert [image.name for image, _ in dataset.entries] == ["a.png", "b.png"]  # a_control.png is no image
    first, second = items(dataset)
    torch.testing.assert_close(first["control"][:, 0, 0], torch.tensor([1.0, 128 / 255, 0.0]))
    assert first["control"].shape == (3, 8, 8)
    assert second.reason == "no control image"
    assert "control" not in items(open_dataset(folder, OPTIONS))[0]  # only when a ControlNet trains
    assert collate([first, first])["control"].shape == (2, 3, 8, 8)

    rows = [{"file_name": "a.png", "text": "x", "conditioning_image": "edges/a.png"},
            {"file_name": "b.png", "text": "y", "conditioning_image": "edges/gone.png"}]  # fmt: skip
    (folder / "edges").mkdir()
    Image.new("L", (32, 32), 255).save(folder / "edges" / "a.png")  # grey and twice the size: RGB, stretched
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    first, second = items(open_dataset(folder, CONTROLLED))
    assert torch.equal(first["control"], torch.ones(3, 8, 8))
    assert second.reason == "no control image (gone.png)"


def test_a_control_image_follows_the_resize_crop_and_flip(tmp_path):
    """The same crop and mirror as the pixels: the control's white column lands where the red one does."""
    picture, control = np.zeros((20, 30, 3), dtype=np.uint8), np.zeros((20, 30, 3), dtype=np.uint8)
    picture[:, 12:15, 0] = 255  # inside every 20-pixel crop, off its centre
    control[:, 12:15] = 255
    Image.fromarray(picture).save(tmp_path / "a.png")
    Image.fromarray(control).save(tmp_path / "a_control.png")
    (tmp_path / "a.txt").write_text("x")
    dataset = open_dataset(tmp_path, ImageOptions(resolution=20, center_crop=False, random_flip=True, controls=True))
    places = set()
    for epoch in range(8):
        item = dataset[(epoch, 0)]
        red = item["pixels"][0] > 0
        assert red.any() and torch.equal(red, item["control"][1] > 0.5)
        places.add(int(red[0].float().argmax()))
    assert len(places) > 2  # the crops and flips moved it


def test_control_images_in_webdataset_shards(tmp_path):
    control = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(control, format="PNG")
    write_shard(tmp_path / "0.tar", {"a": {"png": png(size=(8, 8)), "txt": b"a", "control.png": control.getvalue()},
                                     "b": {"png": png(size=(8, 8)), "txt": b"b"}})  # fmt: skip
    first, second = items(open_dataset(tmp_path, CONTROLLED))
    assert torch.equal(first["control"][2], torch.ones(8, 8)) and second.reason == "no control image"
