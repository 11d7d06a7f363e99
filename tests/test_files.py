"""Outputs are never half-written, never replace a finished output, and a dead writer's partial
files go at the next write; a full disk is one line (ldm/files.py)."""

import errno
import multiprocessing
import os
import socket
import stat
import subprocess
import sys
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from commands.convert import main as convert
from ldm.files import DiskFull, OutputExists, writing
from pipelines.jobs import plan
from pipelines.numbering import reserve
from pipelines.outputs import RunSettings, RunWriter
from pipelines.settings import Generated, GenerationConfig


def test_a_writer_that_finishes_second_is_refused_and_the_first_file_kept(tmp_path):
    target = tmp_path / "model.safetensors"
    with pytest.raises(OutputExists, match="already exists"):
        with writing(target) as partial:
            partial.write_text("second")
            target.write_text("first")  # another process finished it meanwhile
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_two_converts_to_one_output_one_wins_and_the_other_says_so(tiny_model_dir, tmp_path):
    """Two real processes started together; whichever finishes second gets one line and exit 2."""
    out = tmp_path / "one.safetensors"
    command = [sys.executable, "-m", "commands.convert", str(tiny_model_dir), str(out)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "already exists; choose a new name" in loser and len(loser.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["one.safetensors"]


def test_a_dead_writers_partials_are_removed_at_the_next_write(tmp_path):
    dead_file, dead_folder = tmp_path / ".a.png.partial-99999999", tmp_path / ".model.partial-99999998"
    dead_file.write_text("half")
    dead_folder.mkdir()
    alive = tmp_path / f".b.png.partial-{os.getpid()}"  # a writer still running: kept
    alive.write_text("writing")
    with writing(tmp_path / "c.txt") as partial:
        partial.write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "c.txt"]


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "earlier.png").write_text("kept")
    with pytest.raises(DiskFull, match="out.png: no space left on the device; nothing was written there"):
        with writing(tmp_path / "out.png") as partial:
            partial.write_text("half of it")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.png"]


CONFIG = GenerationConfig(steps=2, guidance_scale=2.0, scheduler="euler", seed=0, height=8, width=8)


def test_two_runs_into_one_folder_take_distinct_numbers_and_each_keeps_its_grid(tmp_path):
    """Both reserve before either writes (as two runs started together do): the second run's numbers
    follow the first's, grid included, however their images interleave."""
    settings = RunSettings("model", None, (), None, None)
    first, second = RunWriter(tmp_path, settings, CONFIG), RunWriter(tmp_path, settings, CONFIG)
    jobs = plan(["p"], 2, 0)
    for writer in (first, second):
        writer.reserve(jobs, {})
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    for job in jobs:
        for writer in (second, first):
            writer.write(Generated(image=image, prompt="p", seed=job.seed, config=CONFIG), job)
    first.finish(jobs)
    second.finish(jobs)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00000-0.png", "00001-1.png", "00002-grid.png", "00003-0.png", "00004-1.png", "00005-grid.png",
                     "manifest.jsonl"]  # fmt: skip


def _reserve_many(outdir: Path, start: Event, rounds: int, found: Queue) -> None:
    start.wait()
    found.put([reserve(outdir, 4) for _ in range(rounds)])


def test_processes_reserving_at_once_never_share_a_number(tmp_path):
    """Eight real processes released together, each reserving blocks of four numbers ten times
    (forked: they run the reservation alone, not the libraries' imports)."""
    context = multiprocessing.get_context("fork")
    start, found = context.Event(), context.Queue()
    workers = [context.Process(target=_reserve_many, args=(tmp_path, start, 10, found)) for _ in range(8)]
    for worker in workers:
        worker.start()
    start.set()
    firsts = [first for _ in workers for first in found.get(timeout=60)]
    for worker in workers:
        worker.join(60)
    numbers = [first + k for first in firsts for k in range(4)]
    assert len(set(numbers)) == len(numbers) == 8 * 10 * 4  # each number once (a gap may stay where runs met)
    held = sorted(int(p.name[1:6]) for p in tmp_path.iterdir())  # until written: these processes write nothing
    assert held == sorted(numbers)


def test_a_killed_runs_reservations_are_freed_by_the_next_run(tmp_path):
    host = socket.gethostname()
    (tmp_path / ".00000.reserved").write_text(f"{host}:99999999")  # a pid that does not run
    (tmp_path / ".00001.reserved").write_text(f"{host}:{os.getpid()}")  # a run still drawing
    (tmp_path / ".00002.reserved").write_text("another-machine:99999999")  # a shared folder: not ours to judge
    assert reserve(tmp_path, 1) == 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".00001.reserved", ".00002.reserved", ".00003.reserved"]


def test_a_run_stopped_before_its_first_image_leaves_no_folder(tmp_path):
    writer = RunWriter(tmp_path / "run", RunSettings("model"), CONFIG)
    writer.reserve(plan(["p"], 3, 0), {})
    writer.release()
    assert not (tmp_path / "run").exists()


def test_convert_onto_an_existing_output_is_refused_before_reading_the_model(tmp_path, capsys):
    (tmp_path / "out.safetensors").write_text("mine")
    assert convert(["nowhere/model", str(tmp_path / "out.safetensors")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_convert_on_a_full_disk_is_one_line_and_leaves_no_partial_file(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """safetensors reports ENOSPC in its own exception type, as it did on a real 2 MB tmpfs."""

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("ldm.model.save_file", full)
    assert convert([str(tiny_model_dir), str(tmp_path / "one.safetensors")]) == 2
    assert capsys.readouterr().err.endswith("one.safetensors: no space left on the device; nothing was written there\n")
    assert list(tmp_path.iterdir()) == []


def test_replace_puts_a_whole_new_file_over_the_old_one(tmp_path):
    (tmp_path / "config.yaml").write_text("old")
    with writing(tmp_path / "config.yaml", replace=True) as partial:
        partial.write_text("new")
    assert (tmp_path / "config.yaml").read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_a_saved_model_folder_gets_the_users_normal_permissions(tiny_model, tmp_path):
    """safetensors creates its files 0600; a model folder's weights were left so."""
    old = os.umask(0o022)
    try:
        tiny_model.save(tmp_path / "model")
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "model").rglob("*")}
    assert {mode for name, mode in modes.items() if (tmp_path / name).is_file()} == {0o644}, modes
    assert {mode for name, mode in modes.items() if (tmp_path / name).is_dir()} == {0o755}, modes
