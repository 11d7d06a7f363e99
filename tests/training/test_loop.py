"""Training on CPU with the tiny model: it learns, it resumes exactly, what it saves loads everywhere."""

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline

import train
from ldm.data.shapes import main as make_shapes
from ldm.model import LatentDiffusion
from ldm.train.config import load_config
from ldm.train.loop import Trainer


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    assert make_shapes(["--out", str(folder / "data"), "--n", "4", "--size", "16", "--seed", "0"]) == 0
    return folder / "data"


def recipe(tmp_path, data, **sections):
    spec = {
        "output_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny"},
        "data": {"path": str(data), "resolution": 16},
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


def test_a_tiny_model_overfits_four_images(four_images, tmp_path):
    trainer = Trainer(load_config(recipe(tmp_path, four_images, steps={"max": 120}), []))
    trainer.run()
    first, last = sum(trainer.losses[:10]) / 10, sum(trainer.losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


class Stop(Exception):
    pass


def test_a_resumed_run_reproduces_the_uninterrupted_one(four_images, tmp_path, monkeypatch):
    options = ["optim.lr_scheduler=cosine", "optim.warmup_steps=5", "diffusion.snr_gamma=5.0"]
    whole = Trainer(load_config(recipe(tmp_path / "whole", four_images), options))
    whole.run()

    path = recipe(tmp_path / "split", four_images)
    first = Trainer(load_config(path, options))
    after_step = Trainer._after_step

    def stop_at_20(self, *args):
        after_step(self, *args)
        if self.progress.step == 20:
            raise Stop  # killed right after the step-20 checkpoint

    monkeypatch.setattr(Trainer, "_after_step", stop_at_20)
    with pytest.raises(Stop):
        first.run()
    monkeypatch.setattr(Trainer, "_after_step", after_step)
    second = Trainer(load_config(path, [*options, "checkpoint.resume=latest"]))
    second.run()

    assert first.losses == pytest.approx(whole.losses[:20], abs=1e-6)
    assert second.losses == pytest.approx(whole.losses[20:], abs=1e-6)
    expected = whole.model.unet.state_dict()
    for key, value in second.model.unet.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0)


def test_what_train_py_saves_loads_in_diffusers_and_in_ours(four_images, tmp_path, capsys):
    path = recipe(
        tmp_path, four_images, steps={"max": 4}, validation={"prompts": ["a red circle"], "every": 2, "steps": 2}
    )
    assert train.main(["--config", str(path)]) == 0
    assert "trained 4 steps; skipped 0 bad item(s)" in capsys.readouterr().out
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    assert yaml.safe_load((run / "config.yaml").read_text())["steps"]["max"] == 4
    ours = LatentDiffusion.load(run / "model")
    theirs = StableDiffusionPipeline.from_pretrained(run / "model")
    for key, value in ours.unet.state_dict().items():
        assert torch.equal(theirs.unet.state_dict()[key], value)


def test_a_finished_run_is_never_overwritten(four_images, tmp_path, capsys):
    path = recipe(tmp_path, four_images, steps={"max": 2})
    assert train.main(["--config", str(path)]) == 0
    assert train.main(["--config", str(path)]) == 2
    assert "already holds a trained model; choose a new one" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.learnin_rate=1"], "optim.learnin_rate: unknown key; valid here: betas, eps, learning_rate"),
        (["steps.max=many"], "steps.max: Value 'many' of type 'str' could not be converted to Integer"),
        (["stage=vae"], "stage='vae': use one of diffusion, autoencoder"),
        (["optim.lr_scheduler=warm"], "optim.lr_scheduler='warm': use one of linear, cosine"),
        (["data.path=/nowhere"], "data.path='/nowhere': no such folder or .tar file"),
        (["checkpoint.resume=latest"], "checkpoint.resume=latest: no checkpoint in"),
        (["steps.max"], "'steps.max': overrides are dotted.key=value"),
    ],
)
def test_config_errors_are_one_line_before_any_work(four_images, tmp_path, capsys, overrides, message):
    assert train.main(["--config", str(recipe(tmp_path, four_images)), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_missing_required_value_is_named(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("model:\n  preset: tiny\ndata:\n  path: x\n")
    assert train.main(["--config", str(tmp_path / "recipe.yaml")]) == 2
    assert capsys.readouterr().err == "train.py: error: output_dir: required, and not set\n"
