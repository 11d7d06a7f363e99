"""Shared by the training tests: a four-image shapes folder, tiny recipes, a fresh Accelerate state."""

from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from PIL import Image

import sample
import train
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


def run_recipe_then_sample(recipe_file: str, folder, model_dir, tmp_path, size: int, *overrides: str) -> Path:
    """A shipped recipe as the README runs it, made small (2 steps, a validation grid at step 2),
    then `sample.py --lora` with the LoRA it wrote; returns the run folder."""
    run = tmp_path / "run"
    options = [f"data.path={folder}", f"output_dir={run}", f"model.pretrained={model_dir}",
               f"data.resolution={size}", f"data.cache_dir={tmp_path / 'cache'}", "steps.max=2",
               "steps.mixed_precision=no", "report_to=none", "validation.prompts=[a red circle]",
               "validation.every=2", "validation.steps=2", *overrides]  # fmt: skip
    assert train.main(["--config", recipe_file, *options]) == 0
    assert (run / "lora.safetensors").is_file()
    base, after = Image.open(run / "validation" / "base.png"), Image.open(run / "validation" / "step-00000002.png")
    assert base.size == (size, size)
    assert after.size == (2 * base.width + 4, base.height)  # the base model's grid beside the trained one
    lora = f"{run / 'lora.safetensors'}:0.8"
    argv = ["--model", str(model_dir), "--prompt", "a red circle", "--steps", "2", "--height", str(size),
            "--width", str(size), "--lora", lora, "--outdir", str(tmp_path / "out")]  # fmt: skip
    assert sample.main(argv) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    return run


def assert_model_unchanged(trainer, model_dir, folder_hash_before: str) -> None:
    """A stage that trains beside a frozen model (textual inversion, ControlNet) left it as it was:
    its folder's bytes, and every weight of the model in memory."""
    from conftest import folder_hash
    from ldm.model import LatentDiffusion

    assert folder_hash(model_dir) == folder_hash_before
    unchanged = LatentDiffusion.load(model_dir).parts()
    for name, part in trainer.model.parts().items():
        for key, value in part.state_dict().items():
            assert torch.equal(value, unchanged[name].state_dict()[key]), f"{name}.{key}"


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
