import json
import re

import numpy as np
from PIL import Image

from commands.make_shapes import main
from ldm.data.shapes import COLORS, POSITIONS, SHAPES

CAPTION = re.compile(
    rf"^a (small|large) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) ({'|'.join(POSITIONS)})"
    rf"( and a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) ({'|'.join(POSITIONS)}))?$"
)


def test_captions_follow_the_grammar_and_images_are_shapes_on_black(tmp_path):
    assert main(["--out", str(tmp_path / "d"), "--n", "40", "--size", "32", "--seed", "1"]) == 0
    captions = [(tmp_path / "d" / f"{i:05d}.txt").read_text().strip() for i in range(40)]
    assert all(CAPTION.match(c) for c in captions), [c for c in captions if not CAPTION.match(c)]
    assert any(" and a " in c for c in captions) and any(" and a " not in c for c in captions)
    image = np.asarray(Image.open(tmp_path / "d" / "00000.png"))
    assert image.shape == (32, 32, 3)
    colours = {tuple(p) for p in image.reshape(-1, 3)}
    assert (0, 0, 0) in colours and colours <= {(0, 0, 0), *COLORS.values()}


def test_each_shape_is_boxed_under_its_colour_and_shape_words(tmp_path):
    assert main(["--out", str(tmp_path / "d"), "--n", "20", "--size", "32", "--seed", "2"]) == 0
    for i in range(20):
        words = (tmp_path / "d" / f"{i:05d}.txt").read_text().split()
        boxes = json.loads((tmp_path / "d" / f"{i:05d}.boxes.json").read_text())
        assert set(boxes) == {w for w in words if w in COLORS or w in SHAPES}
        if " and " in " ".join(words):
            continue
        (box,) = boxes[next(w for w in words if w in SHAPES)]
        ys, xs = np.nonzero(np.asarray(Image.open(tmp_path / "d" / f"{i:05d}.png")).max(axis=2))
        assert box[0] <= xs.min() + 1 and xs.max() <= box[2] + 1 and box[1] <= ys.min() + 1 and ys.max() <= box[3] + 1
        assert xs.max() - xs.min() >= (min(box[2], 31) - max(box[0], 0)) * 0.7  # tight, not anywhere around


def test_the_same_seed_gives_the_same_data_and_n_does_not_change_earlier_items(tmp_path):
    main(["--out", str(tmp_path / "a"), "--n", "5", "--seed", "7"])
    main(["--out", str(tmp_path / "b"), "--n", "8", "--seed", "7"])
    for i in range(5):
        assert (tmp_path / "a" / f"{i:05d}.png").read_bytes() == (tmp_path / "b" / f"{i:05d}.png").read_bytes()
        assert (tmp_path / "a" / f"{i:05d}.txt").read_text() == (tmp_path / "b" / f"{i:05d}.txt").read_text()


def test_left_out_pairs_never_appear(tmp_path):
    main(["--out", str(tmp_path / "d"), "--n", "200", "--size", "16", "--leave-out", "red circle, blue square"])
    text = " ".join(p.read_text() for p in (tmp_path / "d").glob("*.txt"))
    assert "red circle" not in text and "blue square" not in text
    assert "red square" in text and "blue circle" in text


def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--n", "3", "--leave-out", "purple circle"]) == 2
    assert "--leave-out 'purple circle': expected 'COLOR SHAPE'" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    assert main(["--out", str(tmp_path / "full"), "--n", "3"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_extra_colours_are_drawn_and_boxed_and_only_colours_draws_just_them(tmp_path):
    argv = ["--out", str(tmp_path / "d"), "--n", "20", "--size", "32", "--colors", "rose=255,0,128,lime=128,255,0"]
    assert main([*argv, "--only-colors", "rose"]) == 0
    captions = [p.read_text() for p in sorted((tmp_path / "d").glob("*.txt"))]
    assert all(" rose " in c and not any(f" {name} " in c for name in COLORS) for c in captions)
    pixels = {tuple(p) for f in (tmp_path / "d").glob("*.png") for p in np.asarray(Image.open(f)).reshape(-1, 3)}
    assert pixels == {(0, 0, 0), (255, 0, 128)}
    boxes = json.loads((tmp_path / "d" / "00000.boxes.json").read_text())
    assert "rose" in boxes
    # the default palette and seed give the same data as before the option existed
    main(["--out", str(tmp_path / "a"), "--n", "3", "--seed", "7"])
    main(["--out", str(tmp_path / "b"), "--n", "3", "--seed", "7", "--only-colors", ",".join(COLORS)])
    for name in ("00002.png", "00002.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_bad_colours_are_one_line_and_exit_2(tmp_path, capsys):
    for argv, message in [
        (["--colors", "purple"], "--colors 'purple': expected NAME=R,G,B"),
        (["--colors", "dark=20,0,40"], "--colors dark=20,0,40: channels 0..255, the brightest above 128"),
        (["--only-colors", "purple"], "--only-colors purple: not in the palette"),
    ]:
        assert main(["--out", str(tmp_path / "d"), "--n", "3", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_outline_draws_hollow_shapes_with_the_same_captions_and_boxes(tmp_path, capsys):
    main(["--out", str(tmp_path / "filled"), "--n", "4", "--seed", "3", "--two-objects", "0"])
    main(["--out", str(tmp_path / "hollow"), "--n", "4", "--seed", "3", "--two-objects", "0", "--outline", "2"])
    for i in range(4):
        for suffix in (".txt", ".boxes.json"):
            name = f"{i:05d}{suffix}"
            assert (tmp_path / "filled" / name).read_text() == (tmp_path / "hollow" / name).read_text()
        filled = np.asarray(Image.open(tmp_path / "filled" / f"{i:05d}.png")).max(axis=2) > 0
        hollow = np.asarray(Image.open(tmp_path / "hollow" / f"{i:05d}.png")).max(axis=2) > 0
        assert (hollow <= filled).all() and hollow.sum() < 0.8 * filled.sum()
    assert main(["--out", str(tmp_path / "bad"), "--n", "3", "--outline", "-1"]) == 2
    assert "--outline 0 or more" in capsys.readouterr().err


def test_layouts_fill_each_shapes_box_with_its_colour_and_stay_out_of_the_dataset(tmp_path):
    """--layouts: NNNNN_control.png, each shape's box filled with its colour (the later shape over the
    earlier); a folder dataset lists the images, not their layouts."""
    from ldm.data.datasets import ImageOptions, open_dataset

    assert main(["--out", str(tmp_path / "d"), "--n", "12", "--size", "32", "--seed", "3", "--layouts"]) == 0
    for i in range(12):
        words = (tmp_path / "d" / f"{i:05d}.txt").read_text().split()
        layout = np.asarray(Image.open(tmp_path / "d" / f"{i:05d}_control.png"))
        colour = next(w for w in words if w in COLORS)
        x0, y0, x1, y1 = json.loads((tmp_path / "d" / f"{i:05d}.boxes.json").read_text())[colour][0]
        centre = layout[round((y0 + y1) / 2), round((x0 + x1) / 2)]
        if " and " not in " ".join(words):
            assert tuple(centre) == COLORS[colour]
            assert {tuple(p) for p in layout.reshape(-1, 3)} == {(0, 0, 0), COLORS[colour]}
    assert len(open_dataset(tmp_path / "d", ImageOptions(resolution=32))) == 12
