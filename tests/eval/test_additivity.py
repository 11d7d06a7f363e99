"""The additivity probe of an autoencoder: its fit, and its verdict on a perfectly additive code."""

from types import SimpleNamespace

import pytest
import torch

from commands.eval_additivity import main
from ldm.data.shapes import parse_pairs
from ldm.eval.additivity import additive_fit, probe
from ldm.eval.judge import DEFAULT_LEFT_OUT


def test_the_fit_recovers_a_held_out_cell_of_an_additive_table():
    torch.manual_seed(0)
    table = torch.randn(1, 1, 5) + torch.randn(8, 1, 5) + torch.randn(1, 3, 5)
    known = torch.ones(8, 3, dtype=torch.bool)
    known[2, 2] = known[3, 0] = False
    torch.testing.assert_close(additive_fit(table, known), table, atol=1e-4, rtol=0)


class MaskAndColour:
    """An ideal code: the shape's mask in one channel, its colour spread over the other three, so a
    colour-shape pair's code is exactly colour part + shape part."""

    config = SimpleNamespace(scaling_factor=1.0)

    def encode(self, pixels):
        mask = (pixels.amax(1, keepdim=True) > 0).float()
        colour = (pixels * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True)
        code = torch.cat([mask, colour.expand_as(pixels)], 1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: code))

    def decode(self, code):
        mask, colour = code[:, :1].round(), code[:, 1:]
        return SimpleNamespace(sample=-1 + mask * (colour + 1))


def test_a_perfectly_additive_code_decodes_every_pair_right():
    counts = probe(MaskAndColour(), parse_pairs(DEFAULT_LEFT_OUT))
    assert counts == {"seen": {"right": 396, "of": 396}, "left-out": {"right": 36, "of": 36}}


def test_a_model_without_a_vae_is_refused_in_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"eval_additivity: error: --model {tmp_path}: no vae/ folder there\n"


@pytest.mark.parametrize("pairs", ["blue", "blue hexagon"])
def test_bad_left_out_pairs_are_refused(tmp_path, capsys, pairs):
    assert main(["--model", str(tmp_path), "--left-out", pairs]) == 2
    assert capsys.readouterr().err.startswith("eval_additivity: error: --left-out")
