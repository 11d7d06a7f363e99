"""Training on CPU with the tiny model: it learns, it resumes exactly, what it saves loads everywhere."""

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from training.conftest import Stop, recipe

import train
from conftest import perturbed_tiny_model
from ldm.data.datasets import ImageOptions, open_dataset
from ldm.model import LatentDiffusion, SamplingDefaults
from ldm.train.config import load_config
from ldm.train.loop import Trainer, build_model


def test_a_tiny_model_overfits_four_images(four_images, tmp_path):
    trainer = Trainer(load_config(recipe(tmp_path, four_images, steps={"max": 120}), []))
    trainer.run()
    first, last = sum(trainer.losses[:10]) / 10, sum(trainer.losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_a_resumed_run_reproduces_the_uninterrupted_one(four_images, tmp_path, monkeypatch):
    options = ["optim.lr_scheduler=cosine", "optim.warmup_steps=5", "loss.min_snr_gamma=5.0"]
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
    validation = {"prompts": ["a red circle"], "every": 2, "steps": 2, "guidance_scale": 3.0}
    path = recipe(tmp_path, four_images, steps={"max": 4}, validation=validation)
    assert train.main(["--config", str(path)]) == 0
    assert "trained 4 steps; skipped 0 bad file(s)" in capsys.readouterr().out
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    assert yaml.safe_load((run / "config.yaml").read_text())["steps"]["max"] == 4
    ours = LatentDiffusion.load(run / "model")
    theirs = StableDiffusionPipeline.from_pretrained(run / "model")
    for key, value in ours.unet.state_dict().items():
        assert torch.equal(theirs.unet.state_dict()[key], value)
    assert ours.sampling == SamplingDefaults(steps=2, guidance_scale=3.0)  # sample.py's defaults: validation's


def test_the_ema_averages_a_jointly_trained_text_encoder_too(four_images, tmp_path):
    options = ["diffusion.train_text_encoder=true", "ema_decay=0.5"]
    trainer = Trainer(load_config(recipe(tmp_path, four_images, steps={"max": 3}), options))
    trainer.run()
    unet, text_encoder = list(trainer.model.unet.parameters()), list(trainer.model.text_encoder.parameters())
    assert len(trainer.ema.shadow_params) == len(unet) + len(text_encoder)
    # what was saved is the average: the shadow weights were copied into both parts
    assert all(torch.equal(p, s) for p, s in zip(text_encoder, trainer.ema.shadow_params[len(unet) :], strict=True))


def test_a_jointly_trained_text_encoder_can_have_its_own_learning_rate(four_images, tmp_path):
    options = ["diffusion.train_text_encoder=true", "optim.text_encoder_lr=1e-5"]
    trainer = Trainer(load_config(recipe(tmp_path, four_images), options))
    trainer.model = build_model(trainer.config)
    optimizer = trainer._optimizer([trainer.model.unet, trainer.model.text_encoder])
    assert [group["lr"] for group in optimizer.param_groups] == [3e-3, 1e-5]


def test_save_precision_fp16_halves_the_files_and_loads_back_in_fp32(four_images, tmp_path):
    trainer = Trainer(load_config(recipe(tmp_path, four_images, steps={"max": 2}), ["save_precision=fp16"]))
    trainer.run()
    model = tmp_path / "run" / "model"
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):  # fmt: skip
        assert {tensor.dtype for tensor in load_file(model / part).values()} == {torch.float16}, part
    loaded = LatentDiffusion.load(model)
    assert all(p.dtype == torch.float32 for part in loaded.parts().values() for p in part.parameters())
    saved = trainer.model.unet.state_dict()
    for key, value in loaded.unet.state_dict().items():
        assert torch.equal(value, saved[key].float())


def test_a_finished_run_is_never_overwritten(four_images, tmp_path, capsys):
    path = recipe(tmp_path, four_images, steps={"max": 2})
    assert train.main(["--config", str(path)]) == 0
    assert train.main(["--config", str(path)]) == 2
    assert "already holds a trained model; choose a new one" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["no", "bf16"])
def test_mixed_precision_reads_as_written_in_yaml_and_on_the_command_line(four_images, tmp_path, value):
    path = recipe(tmp_path, four_images)
    assert load_config(path, [f"steps.mixed_precision={value}"]).steps.mixed_precision == value
    path.write_text(path.read_text().replace("steps:\n", f"steps:\n  mixed_precision: {value}\n"))  # bare, unquoted
    assert load_config(path, []).steps.mixed_precision == value


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.learnin_rate=1"], "optim.learnin_rate: unknown key; valid here: betas, eps, learning_rate"),
        (["steps.max=many"], "steps.max: Value 'many' of type 'str' could not be converted to Integer"),
        (["stage=vae"], "stage='vae': use one of diffusion, autoencoder"),
        (["optim.lr_scheduler=warm"], "optim.lr_scheduler='warm': use one of linear, cosine"),
        (["diffusion.high_noise_bias=0"], "diffusion.high_noise_bias=0.0: must be above 0"),
        (["diffusion.grounding_loss=-1"], "diffusion.grounding_loss=-1.0: must be 0 or more"),
        (
            ["diffusion.grounding_loss=0.1", "steps.gradient_checkpointing=true"],
            "diffusion.grounding_loss: needs steps.gradient_checkpointing=false",
        ),
        (["data.path=/nowhere"], "data.path='/nowhere': no such folder or .tar file"),
        (["checkpoint.resume=latest"], "checkpoint.resume=latest: no checkpoint in"),
        (["steps.max"], "'steps.max': overrides are dotted.key=value"),
        (["stage=autoencoder", "data.cache_latents=true"], "data.cache_latents=true: for the diffusion stage"),
        (["optim.use_8bit_adam=true"], "optim.use_8bit_adam=true: pip install bitsandbytes"),  # not installed here
        (["data.buckets=true", "data.bucket_step=4"], "data.bucket_step=4: between 8 and data.resolution"),
        (["diffusion.snr_gamma=5"], "diffusion.snr_gamma: now loss.min_snr_gamma"),
        (["loss.min_snr_gamma=0"], "loss.min_snr_gamma=0.0: must be above 0"),
        (["loss.noise_offset=-0.1"], "loss.noise_offset=-0.1: must be 0 or more"),
        (["stage=autoencoder", "loss.masked=true"], "loss: min_snr_gamma, noise_offset and masked are for the"),
        (["loss.masked=true"], "loss.masked=true: no image in"),  # the shapes are opaque, with no mask files
    ],
)
def test_config_errors_are_one_line_before_any_work(four_images, tmp_path, capsys, monkeypatch, overrides, message):
    monkeypatch.setattr("ldm.train.loop.build_model", lambda config: pytest.fail("the model was built"))
    assert train.main(["--config", str(recipe(tmp_path, four_images)), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_loaded_recipe_is_frozen(four_images, tmp_path):
    config = load_config(recipe(tmp_path, four_images), [])
    with pytest.raises(AttributeError):
        config.optim.learning_rate = 1.0


def test_a_missing_required_value_is_named(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("model:\n  preset: tiny\ndata:\n  path: x\n")
    assert train.main(["--config", str(tmp_path / "recipe.yaml")]) == 2
    assert capsys.readouterr().err == "train.py: error: output_dir: required, and not set\n"


def test_latents_are_cached_once_reused_and_rebuilt_when_the_data_changes(four_images, tmp_path):
    cache = tmp_path / "cache"
    options = ["data.cache_latents=true", f"data.cache_dir={cache}", "steps.max=3"]
    first = Trainer(load_config(recipe(tmp_path / "a", four_images), options))
    first.run()
    (cached,) = cache.iterdir()
    stamp = cached.stat().st_mtime_ns
    assert first.dataset.tensors["latent_mean"].shape == (4, 4, 8, 8)
    assert first.dataset.tensors["text"].shape == (4, 77, 8)  # the text encoder is frozen: cached too
    Trainer(load_config(recipe(tmp_path / "b", four_images), options)).run()
    assert list(cache.iterdir()) == [cached] and cached.stat().st_mtime_ns == stamp  # reused

    changed = tmp_path / "changed"
    changed.mkdir()
    for file in four_images.iterdir():
        (changed / file.name).write_bytes(file.read_bytes())
    (changed / "00000.txt").write_text("a small white square at the top")
    Trainer(load_config(recipe(tmp_path / "c", changed), options)).run()
    assert len(list(cache.iterdir())) == 2


def test_cached_latents_follow_the_vae_posterior(four_images, tmp_path):
    trainer = Trainer(
        load_config(
            recipe(tmp_path, four_images), ["data.cache_latents=true", f"data.cache_dir={tmp_path}/c", "steps.max=1"]
        )
    )
    trainer.run()
    item = trainer.dataset[(0, 0)]
    image = open_dataset(four_images, ImageOptions(16))[(0, 0)]["pixels"]
    with torch.no_grad():
        posterior = trainer.model.vae.encode(image[None]).latent_dist
    torch.testing.assert_close(item["latent_mean"], posterior.mean[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(item["latent_std"], posterior.std[0], atol=1e-5, rtol=1e-5)


def test_caching_refuses_random_augmentation(four_images, tmp_path, capsys):
    path = recipe(tmp_path, four_images)
    assert train.main(["--config", str(path), "data.cache_latents=true", "data.random_flip=true"]) == 2
    assert "data.cache_latents=true: needs data.center_crop=true and data.random_flip=false" in capsys.readouterr().err


def test_the_grounding_loss_adds_to_the_loss_and_its_boxes_survive_the_latent_cache(four_images, tmp_path):
    runs = {}
    for weight in (0, 1):
        options = [f"diffusion.grounding_loss={weight}", "data.cache_latents=true", f"data.cache_dir={tmp_path}/c"]
        runs[weight] = Trainer(load_config(recipe(tmp_path / str(weight), four_images, steps={"max": 2}), options))
        runs[weight].run()
    assert runs[1].losses[0] > runs[0].losses[0] + 0.1  # same noise, plus (1 - share inside)² for each word
    cached = runs[1].dataset[(0, 1)]["boxes"]
    assert cached == open_dataset(four_images, ImageOptions(16))[(0, 1)]["boxes"] and len(cached) >= 2


def test_the_masked_loss_weights_pixels_and_its_masks_survive_the_latent_cache(four_images, tmp_path):
    """An all-black mask file trains nothing (loss 0); a mask that keeps the left half gives the
    cache the area-averaged mask at latent size, which equals the masked loss's own pooling."""
    masked = tmp_path / "masked"
    masked.mkdir()
    for file in four_images.glob("0000[0-3].[pt]*"):
        (masked / file.name).write_bytes(file.read_bytes())
    for number in range(4):
        Image.new("L", (16, 16), 0).save(masked / f"0000{number}_mask.png")
    options = ["loss.masked=true", "steps.max=1"]
    black = Trainer(load_config(recipe(tmp_path / "black", masked), options))
    black.run()
    assert black.losses == [0.0]
    half = Image.new("L", (16, 16), 0)
    half.paste(255, (0, 0, 8, 16))
    for number in range(4):
        half.save(masked / f"0000{number}_mask.png")
    cached = Trainer(load_config(recipe(tmp_path / "c", masked), [*options, "data.cache_latents=true",
                                                                  f"data.cache_dir={tmp_path}/cache"]))  # fmt: skip
    cached.run()
    expected = torch.zeros(1, 8, 8)
    expected[..., :4] = 1
    assert torch.equal(cached.dataset[(0, 0)]["mask"], expected) and cached.losses[0] > 0


def test_the_grounding_loss_needs_boxes(four_images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ldm.train.loop.build_model", lambda config: pytest.fail("the model was built"))
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in four_images.glob("0000[0-3].[pt]*"):  # images and captions, no .boxes.json
        (bare / file.name).write_bytes(file.read_bytes())
    assert train.main(["--config", str(recipe(tmp_path, bare)), "diffusion.grounding_loss=0.1"]) == 2
    assert "diffusion.grounding_loss=0.1: needs NAME.boxes.json files beside the images" in capsys.readouterr().err


def test_the_autoencoder_stage_reports_psnr_and_sets_the_latent_scale(four_images, tmp_path):
    trainer = Trainer(
        load_config(
            recipe(tmp_path, four_images, stage="autoencoder", autoencoder={"holdout": 1}),
            ["steps.max=20", "steps.batch_size=3"],
        )
    )
    model = trainer.run()
    assert trainer.losses[-1] < trainer.losses[0]
    assert 0 < trainer.stage.holdout_psnr < 100
    assert model.vae.config.scaling_factor != 0.18215
    saved = LatentDiffusion.load(tmp_path / "run" / "model")
    assert saved.vae.config.scaling_factor == pytest.approx(model.vae.config.scaling_factor)


def test_gradient_checkpointing_gives_the_same_gradients():
    unet = perturbed_tiny_model().unet.train()
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 8)
    grads = []
    for checkpointing in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = checkpointing
        unet(latents, torch.tensor([10, 900]), text).square().mean().backward()
        grads.append([p.grad.clone() for p in unet.parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain)


def test_fine_tuning_a_saved_model_trains_the_unet_only(tiny_model_dir, four_images, tmp_path):
    path = recipe(tmp_path, four_images, model={"pretrained": str(tiny_model_dir)})
    trainer = Trainer(load_config(path, ["model.preset=null", "steps.max=3", "optim.learning_rate=1e-2"]))
    model = trainer.run()
    before = LatentDiffusion.load(tiny_model_dir)
    changed = lambda a, b: any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))  # noqa: E731
    assert changed(model.unet, before.unet)
    assert not changed(model.text_encoder, before.text_encoder) and not changed(model.vae, before.vae)


def test_the_two_object_recipe_fine_tunes_unet_and_text_encoder(tiny_model_dir, four_images, tmp_path):
    """configs/shapes-two-objects.yaml as docs/generation.md runs it, made small: the grounding loss
    reads the shapes' boxes, and both the UNet and the text encoder move, the VAE not."""
    options = [f"data.path={four_images}", f"output_dir={tmp_path / 'run'}", f"model.pretrained={tiny_model_dir}",
               "data.resolution=16", f"data.cache_dir={tmp_path / 'cache'}", "steps.max=2", "steps.batch_size=2",
               "steps.mixed_precision=no", "save_precision=fp32", "optim.learning_rate=1e-2",
               "optim.text_encoder_lr=1e-2"]  # fmt: skip
    assert train.main(["--config", "configs/shapes-two-objects.yaml", *options]) == 0
    model, before = LatentDiffusion.load(tmp_path / "run" / "model"), LatentDiffusion.load(tiny_model_dir)
    changed = lambda a, b: any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))  # noqa: E731
    assert changed(model.unet, before.unet) and changed(model.text_encoder, before.text_encoder)
    assert not changed(model.vae, before.vae)


def test_bf16_mixed_precision_and_tensorboard_logs(four_images, tmp_path):
    path = recipe(tmp_path, four_images, report_to="tensorboard", log_every=1)
    trainer = Trainer(load_config(path, ["steps.max=3", "steps.mixed_precision=bf16"]))
    trainer.run()
    assert all(loss == loss for loss in trainer.losses)  # no NaN
    assert list((tmp_path / "run" / "logs" / "train").glob("events.out.tfevents.*"))


def test_gradient_accumulation_and_checkpoint_rotation(four_images, tmp_path):
    path = recipe(tmp_path, four_images, steps={"max": 6, "batch_size": 2, "gradient_accumulation": 2})
    trainer = Trainer(load_config(path, ["checkpoint.every=2", "checkpoint.keep=2", "loss.noise_offset=0.1"]))
    trainer.run()
    assert len(trainer.losses) == 6  # optimizer steps, each over two batches of two
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000004", "step-00000006"]


@pytest.fixture
def user_folder(four_images, tmp_path):
    """A user's own folder: images and .txt captions, no .boxes.json, two bad files among them."""
    folder = tmp_path / "my-images"
    folder.mkdir()
    for file in four_images.glob("0000[0-3].[pt]*"):
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "broken.txt").write_text("a red circle")
    (folder / "uncaptioned.png").write_bytes((four_images / "00000.png").read_bytes())
    return folder


def test_the_readmes_from_scratch_commands_train_on_a_users_folder(user_folder, tmp_path, capsys):
    """configs/shapes-autoencoder.yaml, then configs/diffusion.yaml, as the README runs them (smaller)."""
    small = ["model.preset=tiny", "data.resolution=16", "steps.max=6", "steps.batch_size=2", "report_to=none"]
    vae, model = tmp_path / "my-vae", tmp_path / "my-model"
    autoencoder = ["--config", "configs/shapes-autoencoder.yaml", f"data.path={user_folder}", f"output_dir={vae}"]
    assert train.main([*autoencoder, *small, "autoencoder.holdout=1"]) == 0
    diffusion = ["--config", "configs/diffusion.yaml", f"data.path={user_folder}", f"model.vae={vae}/model",
                 f"output_dir={model}", "validation.prompts=[a red circle]",
                 f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert train.main([*diffusion, *small, "validation.every=6", "validation.steps=1"]) == 0
    out, err = capsys.readouterr()
    assert out.count("trained 6 steps; skipped 2 bad file(s) (each named above)") == 2
    bad = [line for line in err.splitlines() if line.startswith("skipping ")]  # once per file, per stage
    assert sorted(bad) == sorted(2 * [
        f"skipping {user_folder / 'broken.png'}: unreadable image (UnidentifiedImageError: not a format PIL reads)",
        f"skipping {user_folder / 'uncaptioned.png'}: no caption file (uncaptioned.txt)",
    ])  # fmt: skip
    assert LatentDiffusion.load(model / "model").sampling == SamplingDefaults(steps=1, guidance_scale=2.5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "{tmp}/bad.yaml"],
         "--config {tmp}/bad.yaml: not valid YAML (did not find expected ',' or '}}', line 3)"),
        (["validation.prompts=[a, b"],
         "'validation.prompts=[a, b': not a valid value (did not find expected ',' or ']')"),
        (["output_dir={tmp}/file/run"], "output_dir={tmp}/file/run: cannot write there (Not a directory)"),
    ],
)  # fmt: skip
def test_a_broken_recipe_override_or_output_dir_is_one_line(four_images, tmp_path, capsys, argv, message):
    (tmp_path / "bad.yaml").write_text("output_dir: x\nmodel: {preset: tiny\n")
    (tmp_path / "file").write_text("mine")
    config = [] if argv[0] == "--config" else ["--config", str(recipe(tmp_path, four_images))]
    assert train.main([*config, *(a.format(tmp=tmp_path) for a in argv)]) == 2
    assert capsys.readouterr().err == f"train.py: error: {message.format(tmp=tmp_path)}\n"
