"""Two processes on the CPU (gloo), started as users start them: torchrun --nproc_per_node 2 ..."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from commands.make_shapes import main as make_shapes


def test_two_processes_train_one_model_on_different_data(tmp_path):
    assert make_shapes(["--out", str(tmp_path / "data"), "--n", "8", "--size", "16"]) == 0
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny"},
        "data": {"path": str(tmp_path / "data"), "resolution": 16},
        "steps": {"max": 3, "batch_size": 2},
        "checkpoint": {"every": 3},
        "validation": {"prompts": ["a red circle"], "every": 3, "steps": 2},
        "report_to": "none",
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "report").mkdir()
    worker = Path(__file__).with_name("ddp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}  # for train.py
    done = subprocess.run(
        [*command, str(worker), str(tmp_path / "recipe.yaml"), str(tmp_path / "report")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / "report" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    assert reports[0]["weights"] == reports[1]["weights"]  # one model, kept in sync
    first_epoch = [{index for epoch, index in r["seen"] if epoch == 0} for r in reports]
    assert first_epoch[0] and first_epoch[1] and not first_epoch[0] & first_epoch[1]  # different data
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "model", "validation"]
    assert [p.name for p in (run / "validation").iterdir()] == ["step-00000003.png"]
    # Each process keeps its own RNG state in the checkpoint (that is what makes resuming exact); all else once.
    assert sorted(p.name for p in (run / "checkpoints" / "step-00000003").iterdir() if "random" in p.name) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
