"""DreamBooth: the instance prompt captions every image, class images are drawn once by the base
model and reused, and their loss is weighted by prior_loss_weight."""

import pytest
from PIL import Image
from training.conftest import recipe

import ldm.train.stages
import train
from ldm.train.config import load_config
from ldm.train.loop import Trainer


@pytest.fixture
def subject(tmp_path):
    """Three pictures of one subject, without captions."""
    folder = tmp_path / "subject"
    folder.mkdir()
    for i in range(3):
        image = Image.new("RGB", (16, 16))
        image.paste((255, 0, 128), (2 + i, 2, 12 + i, 12))
        image.save(folder / f"{i}.png")
    return folder


def dreambooth_recipe(tmp_path, data, model_dir, **dreambooth):
    options = {"instance_prompt": "a sks square", "class_prompt": "a square", "class_images": 3, **dreambooth}
    return recipe(
        tmp_path, data, stage="lora", model={"preset": None, "pretrained": str(model_dir)},
        dreambooth=options, steps={"max": 4}, ema_decay=None,
    )  # fmt: skip


def fake_draw(calls):
    def draw(model, prompts, seed, device):
        calls.append((tuple(prompts), seed))
        return [Image.new("RGB", (16, 16), (0, 0, 255)) for _ in prompts]

    return draw


def test_class_images_are_drawn_once_and_reused(tiny_model_dir, subject, tmp_path):
    calls = []
    options = [f"dreambooth.class_dir={tmp_path / 'class'}"]
    Trainer(
        load_config(dreambooth_recipe(tmp_path / "a", subject, tiny_model_dir), options), draw=fake_draw(calls)
    ).run()
    assert calls == [(("a square",) * 3, 0)]
    drawn = sorted((tmp_path / "class").iterdir())
    stamps = [path.stat().st_mtime_ns for path in drawn]
    assert [path.name for path in drawn] == ["00000.png", "00001.png", "00002.png"]
    path = dreambooth_recipe(tmp_path / "b", subject, tiny_model_dir)
    Trainer(load_config(path, options), draw=fake_draw(calls)).run()
    assert len(calls) == 1 and [p.stat().st_mtime_ns for p in sorted((tmp_path / "class").iterdir())] == stamps
    more = Trainer(load_config(path, [*options, "dreambooth.class_images=5", "output_dir=" + str(tmp_path / "c")]),
                   draw=fake_draw(calls))  # fmt: skip
    more.run()
    assert calls[1:] == [(("a square",) * 2, 3)]  # only the missing two, with their own seeds


def test_the_class_loss_is_weighted_and_the_instance_prompt_captions_every_image(
    tiny_model_dir, subject, tmp_path, monkeypatch
):
    seen = []
    loss = ldm.train.stages.diffusion_loss

    def spy(*args, weights=None, **options):
        seen.append(weights.tolist())
        return loss(*args, weights=weights, **options)

    monkeypatch.setattr(ldm.train.stages, "diffusion_loss", spy)
    options = [f"data.cache_dir={tmp_path / 'cache'}", "dreambooth.prior_loss_weight=0.25", "steps.max=6"]
    trainer = Trainer(load_config(dreambooth_recipe(tmp_path, subject, tiny_model_dir), options), draw=fake_draw([]))
    trainer.run()
    captions = [caption for _, caption in trainer.dataset.entries]
    assert captions == ["a sks square"] * 3 + ["a square"] * 3
    weights = [w for batch in seen for w in batch]
    assert set(weights) == {1.0, 0.25} and len(weights) == 6 * 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dreambooth.class_prompt=a sks square"], "dreambooth.class_prompt: must differ from the instance prompt"),
        (["dreambooth.class_images=0"], "dreambooth.class_images=0: must be at least 1"),
        (["stage=autoencoder", "model.preset=tiny", "model.pretrained=null"], "dreambooth: for the diffusion and lora"),
    ],
)
def test_bad_dreambooth_settings_are_one_line(tiny_model_dir, subject, tmp_path, capsys, overrides, message):
    assert train.main(["--config", str(dreambooth_recipe(tmp_path, subject, tiny_model_dir)), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and message in err and err.count("\n") == 1


def test_the_dreambooth_recipe_runs_with_train_pys_painter(tiny_model_dir, subject, tmp_path):
    """configs/dreambooth.yaml made small; the class images drawn by the real pipeline."""
    options = [f"data.path={subject}", f"output_dir={tmp_path / 'run'}", f"model.pretrained={tiny_model_dir}",
               "data.resolution=16", f"data.cache_dir={tmp_path / 'cache'}", "dreambooth.class_images=2",
               "steps.max=2", "steps.mixed_precision=no", "report_to=none", "validation.prompts=[]"]  # fmt: skip
    assert train.main(["--config", "configs/dreambooth.yaml", *options]) == 0
    assert (tmp_path / "run" / "lora.safetensors").is_file()
    assert len(list((tmp_path / "cache" / "class-images").glob("*/*.png"))) == 2
