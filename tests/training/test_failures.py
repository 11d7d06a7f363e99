"""Training runs that go wrong: a kill during a save, a loss that diverges. Nothing half-written or
non-finite is left as if it were good, and the next start knows what to do."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from training.conftest import recipe

import train
from ldm.train.checkpoints import checkpoints_dir

ROOT = Path(__file__).resolve().parents[2]


def test_a_kill_during_the_first_checkpoint_save_leaves_a_run_that_starts_afresh(four_images, tmp_path, capsys):
    """What a process killed inside accelerator.save_state leaves: a partial checkpoint folder, and a
    partial model folder of a dead pid. A fresh start removes both and trains."""
    path = recipe(tmp_path, four_images, steps={"max": 2})
    partial = checkpoints_dir(tmp_path / "run") / ".step-00000010.partial"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")
    dead = tmp_path / "run" / ".model.partial-99999999"  # no such pid
    dead.mkdir()
    assert train.main(["--config", str(path)]) == 0, capsys.readouterr().err
    assert not partial.exists() and not dead.exists()
    assert sorted(p.name for p in checkpoints_dir(tmp_path / "run").iterdir()) == ["step-00000002"]


def test_resume_latest_over_only_a_partial_checkpoint_says_there_is_none(four_images, tmp_path, capsys):
    path = recipe(tmp_path, four_images, steps={"max": 2})
    (checkpoints_dir(tmp_path / "run") / ".step-00000010.partial").mkdir(parents=True)
    assert train.main(["--config", str(path), "checkpoint.resume=latest"]) == 2
    assert "checkpoint.resume=latest: no checkpoint in" in capsys.readouterr().err
    assert not (checkpoints_dir(tmp_path / "run") / ".step-00000010.partial").exists()


def test_a_learning_rate_of_1e6_stops_at_the_first_nan_loss(four_images, tmp_path, capsys):
    """The issue's case: exit 0 and a NaN model before. Now one line, exit 2, no model; the step-1
    checkpoint (huge but finite weights) is the last one written."""
    path = recipe(tmp_path, four_images, steps={"max": 20}, checkpoint={"every": 1, "keep": 100})
    code = train.main(["--config", str(path), "optim.learning_rate=1e6"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    checkpoint = checkpoints_dir(tmp_path / "run") / "step-00000001"
    assert code == 2 and errors == [
        f"train.py: error: step 2: the loss is not finite (NaN or infinity); stopped, the last good checkpoint is "
        f"{checkpoint}. Lower optim.learning_rate (now 1e+06)"
    ], err
    assert not (tmp_path / "run" / "model").exists()
    assert sorted(checkpoints_dir(tmp_path / "run").iterdir()) == [checkpoint]


def test_a_non_finite_weight_is_never_saved(four_images, tmp_path, monkeypatch, capsys):
    """An update that makes a weight NaN while the loss was finite: stopped before its checkpoint."""
    path = recipe(tmp_path, four_images, steps={"max": 20}, checkpoint={"every": 1, "keep": 100})
    step = torch.optim.AdamW.step
    calls = []

    def poisoned_third_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_third_step)
    assert train.main(["--config", str(path)]) == 2
    assert "step 3: a trained weight is not finite" in capsys.readouterr().err
    assert sorted(p.name for p in checkpoints_dir(tmp_path / "run").iterdir()) == ["step-00000001", "step-00000002"]


def test_a_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(four_images, tmp_path, monkeypatch, capsys):
    path = recipe(tmp_path, four_images, steps={"max": 20}, checkpoint={"every": 2, "keep": 100})
    from ldm.train import stages

    loss = stages.DiffusionStage.loss
    calls = []

    def nan_at_step_5(self, batch, wrapped):
        calls.append(1)
        return loss(self, batch, wrapped) * (float("nan") if len(calls) == 5 else 1.0)

    monkeypatch.setattr(stages.DiffusionStage, "loss", nan_at_step_5)
    assert train.main(["--config", str(path)]) == 2
    checkpoint = checkpoints_dir(tmp_path / "run") / "step-00000004"
    assert f"step 5: the loss is not finite (NaN or infinity); stopped, the last good checkpoint is {checkpoint}" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in checkpoints_dir(tmp_path / "run").iterdir()) == ["step-00000002", "step-00000004"]
    assert not (tmp_path / "run" / "model").exists()
    for name in os.listdir(checkpoint):
        if name.endswith(".safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(checkpoint / name).values())


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_earlier_checkpoints(
    four_images, tmp_path, monkeypatch, capsys
):
    path = recipe(tmp_path, four_images, steps={"max": 6}, checkpoint={"every": 2, "keep": 100})
    save_state = Accelerator.save_state

    def full_at_step_4(self, output_dir, **kwargs):
        if "step-00000004" in output_dir:
            os.makedirs(output_dir, exist_ok=True)
            open(os.path.join(output_dir, "model.safetensors"), "wb").write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_at_step_4)
    assert train.main(["--config", str(path)]) == 2
    assert "step-00000004: no space left on the device; the earlier checkpoints are kept" in capsys.readouterr().err
    assert sorted(p.name for p in checkpoints_dir(tmp_path / "run").iterdir()) == ["step-00000002"]


def test_ctrl_c_while_training_is_one_line_and_130(four_images, tmp_path):
    path = recipe(tmp_path, four_images, steps={"max": 100000}, checkpoint={"every": 1, "keep": 2})
    run = subprocess.Popen([sys.executable, "train.py", "--config", str(path)], cwd=ROOT, stderr=subprocess.PIPE,
                           text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list((tmp_path / "run" / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130
    err = run.stderr.read()
    assert "Traceback" not in err
    assert (
        err.rstrip()
        .splitlines()[-1]
        .endswith("train.py: interrupted; finished checkpoints are kept (continue with checkpoint.resume=latest)")
    )


def test_bad_files_are_reported_before_the_first_step(four_images, tmp_path, capsys):
    """An unreadable image in a short run: named once, above the progress bar, and counted."""
    folder = tmp_path / "data"
    shutil.copytree(four_images, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG not an image")
    (folder / "broken.txt").write_text("a red circle")
    path = recipe(tmp_path, folder, steps={"max": 1})
    assert train.main(["--config", str(path)]) == 0
    captured = capsys.readouterr()
    before_training = captured.err.split("stage:")[0]
    assert f"skipping {folder / 'broken.png'}: unreadable image (UnidentifiedImageError" in before_training
    assert "trained 1 steps; skipped 1 bad file(s) (each named above)" in captured.out
