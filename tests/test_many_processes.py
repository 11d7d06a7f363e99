"""A run shared by several processes, started as users start it (`accelerate launch --multi_gpu
--num_processes 2 sample.py ...`: Accelerate's torchrun launcher, two CPU processes over gloo here):
the same files as one process, and a rerun with --skip-existing after a kill draws only what is
missing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from commands.eval_metrics import main as eval_metrics
from pipelines.outputs import MANIFEST

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square in the top left", "a green triangle"]


@pytest.fixture(autouse=True)
def one_thread():
    """The launched processes get one thread each (OMP_NUM_THREADS=1), so this one computes with one
    too: a sum split over more threads rounds differently, and that is not what is under test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def arguments(model: Path, prompts: Path, outdir: Path) -> list[str]:
    """fp32 named: the launched processes see this machine's CPU, which may have bf16 instructions."""
    return ["--dtype", "fp32", "--model", str(model), "--prompt-file", str(prompts), "--num-images", "2",
            "--seed", "5", "--steps", "2", "--scheduler", "euler-ancestral", "--outdir", str(outdir)]  # fmt: skip


def launch(processes: int, program: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch` as a user types it on a machine without GPUs."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command += program
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def contents(outdir: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Each PNG's pixels and text chunks, by name."""
    found = {}
    for path in sorted(outdir.glob("*.png")):
        with Image.open(path) as image:
            found[path.name] = (np.asarray(image.convert("RGB")), dict(image.text))
    return found


def manifest(outdir: Path) -> list[dict]:
    lines = (outdir / MANIFEST).read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda entry: entry["index"])


def assert_same_files(a: Path, b: Path) -> None:
    one, other = contents(a), contents(b)
    assert list(one) == list(other)
    for name in one:
        assert np.array_equal(one[name][0], other[name][0]), name
        assert one[name][1] == other[name][1], name


def test_two_processes_write_the_files_one_process_writes(tiny_model_dir, prompt_file, tmp_path):
    """An ancestral sampler (fresh noise each step) and two images per prompt: seeds and noise follow
    the image's index in the run, not the process or the batch that drew it."""
    assert sample.main(arguments(tiny_model_dir, prompt_file, tmp_path / "one")) == 0
    done = launch(2, ["sample.py", *arguments(tiny_model_dir, prompt_file, tmp_path / "two")])
    names = [f"{k:05d}-{5 + k}.png" for k in range(6)] + ["00006-grid.png"]
    assert sorted(p.name for p in (tmp_path / "one").glob("*.png")) == names
    assert_same_files(tmp_path / "one", tmp_path / "two")
    assert manifest(tmp_path / "one") == manifest(tmp_path / "two")
    assert [entry["file"] for entry in manifest(tmp_path / "two")] == names[:-1]
    assert [entry["prompt"] for entry in manifest(tmp_path / "two")] == [p for p in PROMPTS for _ in range(2)]
    assert done.stdout.count("sample.py: cpu") == 1  # the main process alone reports


def test_a_rerun_after_a_kill_draws_only_the_missing_images(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    assert sample.main(arguments(tiny_model_dir, prompt_file, tmp_path / "whole")) == 0
    from pipelines.outputs import RunWriter

    write, written = RunWriter.write, []

    def killed_after_two(self, generated, job):
        if len(written) == 2:
            raise KeyboardInterrupt
        write(self, generated, job)
        written.append(job.index)

    monkeypatch.setattr(RunWriter, "write", killed_after_two)
    run = arguments(tiny_model_dir, prompt_file, tmp_path / "resumed")
    assert sample.main(run) == 130
    monkeypatch.setattr(RunWriter, "write", write)
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resumed").glob("*.png")}
    assert sorted(kept) == ["00000-5.png", "00001-6.png"]
    done = launch(2, ["sample.py", *run, "--skip-existing"])  # the rest, shared by two processes
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resumed").glob("0000[01]-*.png")} == kept
    assert_same_files(tmp_path / "whole", tmp_path / "resumed")
    assert len(manifest(tmp_path / "resumed")) == 6
    assert "process 0 of 2: wrote 2 image(s)" in done.stdout  # the main process's share of the four
    assert sample.main([*run, "--skip-existing"]) == 0  # nothing left: nothing drawn, no second grid
    assert_same_files(tmp_path / "whole", tmp_path / "resumed")


def test_skip_existing_needs_the_folder_and_the_seed(prompt_file, capsys):
    assert sample.main(["--prompt-file", str(prompt_file), "--skip-existing", "--seed", "1"]) == 2
    assert "--skip-existing needs --outdir and --seed" in capsys.readouterr().err


def test_the_metrics_are_the_same_with_their_images_drawn_by_two_processes(tiny_model_dir, tiny_clip, prompt_file,
                                                                           capsys):  # fmt: skip
    argv = ["--model", str(tiny_model_dir), "--prompt-file", str(prompt_file), "--clip-model", str(tiny_clip[0]),
            "--steps", "2", "--seed", "3", "--dtype", "fp32"]  # fmt: skip
    assert eval_metrics(argv) == 0
    alone = json.loads(capsys.readouterr().out)
    shared = json.loads(launch(2, ["-m", "commands.eval_metrics", *argv]).stdout)
    assert alone == shared and alone["images"] == len(PROMPTS)


def test_two_runs_started_together_into_one_folder_take_distinct_numbers_and_keep_their_grids(tiny_model_dir, tmp_path):
    """Issue 42: two sample.py processes started together with --num-images 3 each, three times over
    into one folder. Each round adds 8 files under 8 numbers: each run's 3 images and its grid."""
    outdir = tmp_path / "shared"
    command = [sys.executable, "sample.py", "--model", str(tiny_model_dir), "--prompt", "a red circle", "--steps", "4",
               "--num-images", "3", "--device", "cpu", "--dtype", "fp32", "--outdir", str(outdir)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for round_ in range(3):
        seeds = (10 * round_, 10 * round_ + 3)
        runs = [subprocess.Popen([*command, "--seed", str(seed)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for seed in seeds]  # fmt: skip
        results = [(run.wait(300), run.stderr.read()) for run in runs]
        assert [code for code, _ in results] == [0, 0], results
        names = sorted(p.name for p in outdir.glob("*.png"))
        numbers = [int(name[:5]) for name in names]
        assert len(set(numbers)) == len(numbers) == 8 * (round_ + 1), names
        assert sum(name.endswith("-grid.png") for name in names) == 2 * (round_ + 1), names
    assert [p.name for p in outdir.iterdir() if p.name.startswith(".")] == []  # no reservation left behind
    by_number = {int(entry["file"][:5]): int(entry["seed"]) for entry in manifest(outdir)}
    for grid in outdir.glob("*-grid.png"):  # a grid follows its own run's three images
        seeds = [by_number[int(grid.name[:5]) - k] for k in (3, 2, 1)]
        assert seeds == list(range(seeds[0], seeds[0] + 3)), (grid.name, seeds)


def test_two_runs_prepared_before_either_draws_keep_distinct_numbers_and_both_grids(tiny_model_dir, tmp_path):
    """The race above made certain: both runs are set up (their numbers taken) before either writes."""
    outdir = tmp_path / "shared"
    argv = ["--model", str(tiny_model_dir), "--prompt", "a red circle", "--steps", "1", "--num-images", "3",
            "--device", "cpu", "--outdir", str(outdir)]  # fmt: skip
    runs = [sample.prepare(sample.parse([*argv, "--seed", seed])) for seed in ("0", "3")]
    for run in runs:
        sample.draw(*run)
    names = sorted(p.name for p in outdir.iterdir())
    assert names == ["00000-0.png", "00001-1.png", "00002-2.png", "00003-grid.png",
                     "00004-3.png", "00005-4.png", "00006-5.png", "00007-grid.png", "manifest.jsonl"]  # fmt: skip
