from commands.describe import main


def test_describe_prints_every_part_with_its_parameter_count(capsys):
    assert main(["tiny"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "tiny (preset)"
    for line_start in ("text_encoder", "unet", "  down 0", "  mid", "  up 1", "vae", "scheduler", "total"):
        assert any(line.startswith(line_start) for line in out.splitlines()), line_start
    assert "51,364  UNet: 4 -> 4 channels" in out  # the tiny UNet's parameter count
    assert "cross-attention 2 heads x 4" in out


def test_describe_a_saved_model(tiny_model, tmp_path, capsys):
    tiny_model.save(tmp_path / "model")
    assert main([str(tmp_path / "model")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'model'} (loaded)")


def test_an_unknown_preset_is_one_line_and_exit_2(capsys):
    assert main(["sd9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("describe: error: no preset 'sd9'") and err.count("\n") == 1


def test_describe_sdxl_counts_its_two_text_encoders_and_deep_transformers(capsys):
    assert main(["sdxl"]) == 0
    out = capsys.readouterr().out
    assert "694,659,840  CLIPTextModelWithProjection: 32 layers, width 1280" in out
    assert "2,567,463,684  UNet: 4 -> 4 channels, cross-attention to 2048-wide text" in out
    assert "  down 0" in out and "no attention" in out and "20 heads x 64, 10 transformer blocks deep" in out


def test_save_builds_a_preset_into_a_folder_that_samples_offline(tmp_path, capsys):
    """The README's offline SDXL: describe sdxl-tiny --save DIR, then sample.py --model DIR."""
    import sample
    from ldm.model import LatentDiffusion

    assert main(["sdxl-tiny", "--save", str(tmp_path / "sdxl")]) == 0
    assert capsys.readouterr().out.endswith(f"wrote {tmp_path / 'sdxl'}\n")
    model = LatentDiffusion.load(tmp_path / "sdxl")
    assert model.is_sdxl and not model.is_refiner
    argv = ["--model", str(tmp_path / "sdxl"), "--prompt", "a lighthouse", "--steps", "2"]
    argv += ["--outdir", str(tmp_path / "o")]
    assert sample.main([*argv, "--device", "cpu"]) == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


def test_save_refuses_an_existing_folder_and_a_loaded_model(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["tiny", "--save", str(tmp_path / "taken")]) == 2
    assert main([str(tiny_model_dir), "--save", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert "already exists; choose a new folder" in err and "--save: builds a preset" in err
