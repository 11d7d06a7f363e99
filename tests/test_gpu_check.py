"""scripts/gpu_check.py, the one command a lent GPU runs, kept from rotting: its --smoke mode runs
the same code on the CPU with the tiny presets (torch.compile with the eager backend)."""

import re

import torch

from scripts.gpu_check import main


def test_the_smoke_run_fills_every_row_of_the_table(capsys):
    assert main(["--smoke"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    checks = [row.split(" | ")[0] for row in rows]
    expected_checks = ("image, fp16, ours vs diffusers", "image, bf16, ours vs diffusers", "ours, SDPA",
                       "diffusers, SDPA", "channels-last", "ours, torch.compile", "both compiled", "SDXL",
                       "SDXL LoRA (rank 16) step", "SD 1.5 full fine-tuning step")  # fmt: skip
    for expected in expected_checks:
        assert any(expected in check for check in checks), expected
    for row in rows:
        assert re.search(r"\d", row.split(" | ")[1]), row  # every row holds a figure
    images = [row for row in rows if "ours vs diffusers" in row]
    assert all(int(re.search(r"max (\d+)/255", row).group(1)) <= 2 for row in images)  # the tiny model: 2/255


def test_without_a_gpu_it_says_so_and_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err
