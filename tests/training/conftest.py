"""Shared by the training tests: a four-image shapes folder, tiny recipes, a fresh Accelerate state."""

import pytest
import yaml
from accelerate.state import AcceleratorState

from commands.make_shapes import main as make_shapes


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one global state per process (train.py runs one Trainer per process);
    these tests run many, with different precisions, so each starts afresh."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    assert make_shapes(["--out", str(folder / "data"), "--n", "4", "--size", "16", "--seed", "0"]) == 0
    return folder / "data"


def recipe(tmp_path, folder, **sections):
    spec = {
        "output_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny"},
        "data": {"path": str(folder), "resolution": 16},
        "optim": {"learning_rate": 3e-3},
        "steps": {"max": 30, "batch_size": 4},
        "checkpoint": {"every": 10, "keep": 5},
        "report_to": "none",
    }
    for key, value in sections.items():
        spec.setdefault(key, {}).update(value) if isinstance(value, dict) else spec.update({key: value})
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class Stop(Exception):
    pass


def run_until(monkeypatch, config, step: int) -> None:
    """Train with `config`, killed right after `step` (its checkpoint written), as a crash would."""
    from ldm.train.loop import Trainer

    after_step = Trainer._after_step

    def stop(self, *args):
        after_step(self, *args)
        if self.progress.step == step:
            raise Stop

    monkeypatch.setattr(Trainer, "_after_step", stop)
    with pytest.raises(Stop):
        Trainer(config).run()
    monkeypatch.setattr(Trainer, "_after_step", after_step)
