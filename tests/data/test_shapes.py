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
