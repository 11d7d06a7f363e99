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
