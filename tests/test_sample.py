"""sample.py as a user runs it: files, metadata, no overwriting, one-line errors with exit code 2."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

import sample
from ldm.model import read_preset
from ldm.single_file import save_single_file
from pipelines.choices import SCHEDULERS
from pipelines.model_files import model_hash
from pipelines.outputs import read_manifest
from pipelines.text_to_image import TextToImagePipeline


def no_report(out: str) -> bool:
    """Standard output has at most the line saying where the model loaded, and no "wrote" line."""
    return all(line.startswith("sample.py: ") for line in out.splitlines())


def run(capsys, *argv) -> tuple[int, str, str]:
    code = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_writes_numbered_pngs_carrying_their_parameters_and_a_grid(tiny_model_dir, tmp_path, capsys):
    code, out, _ = run(
        capsys, "--model", tiny_model_dir, "--prompt", "a (red) circle", "--negative-prompt", "blue",
        "--num-images", "3", "--batch-size", "2", "--steps", "2", "--seed", "5", "--scheduler", "euler",
        "--outdir", tmp_path / "run", "--device", "cpu",
    )  # fmt: skip
    assert code == 0 and out.splitlines()[-1] + "\n" == f"wrote 3 image(s) to {tmp_path / 'run'}\n"
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["00000-5.png", "00001-6.png", "00002-7.png", "00003-grid.png", "manifest.jsonl"]  # in order
    info = Image.open(tmp_path / "run" / "00001-6.png").text
    assert {k: info[k] for k in ("prompt", "negative_prompt", "seed", "steps", "scheduler", "guidance_scale")} == {
        "prompt": "a (red) circle",
        "negative_prompt": "blue",
        "seed": "6",
        "steps": "2",
        "scheduler": "euler",
        "guidance_scale": "7.5",
    }
    assert (info["model"], info["model_hash"]) == ("tiny", model_hash(tiny_model_dir))  # the name, not the path
    weights = (tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    short_hash = hashlib.sha256(weights).hexdigest()[:10]  # A1111's "Model hash"
    assert info["parameters"] == (
        "a (red) circle\nNegative prompt: blue\n"
        f"Steps: 2, Sampler: Euler, CFG scale: 7.5, Seed: 6, Size: 16x16, Model hash: {short_hash}, Model: tiny"
    )
    assert Image.open(tmp_path / "run" / "00003-grid.png").size == (32, 32)  # 2 x 2 cells


def test_a_second_run_in_the_same_folder_overwrites_nothing(tiny_model_dir, tmp_path, capsys):
    options = ["--model", tiny_model_dir, "--prompt", "a red circle", "--steps", "1", "--outdir", tmp_path]
    assert run(capsys, *options, "--seed", "1")[0] == 0
    before = (tmp_path / "00000-1.png").read_bytes()
    assert run(capsys, *options, "--seed", "9")[0] == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000-1.png", "00001-9.png"]
    assert (tmp_path / "00000-1.png").read_bytes() == before


def test_attention_maps_are_written_beside_the_image(tiny_model_dir, tmp_path, capsys):
    options = ["--prompt", "a red circle", "--steps", "1", "--seed", "0", "--attention-maps"]
    assert run(capsys, "--model", tiny_model_dir, *options, "--outdir", tmp_path)[0] == 0
    maps = sorted(p.name for p in tmp_path.iterdir() if "attention" in p.name)
    assert maps == ["00000-0-attention-00-a.png", "00000-0-attention-01-red.png", "00000-0-attention-02-circle.png"]
    assert Image.open(tmp_path / maps[1]).size == (16, 16)


def test_prompts_from_a_file_and_a_single_file_checkpoint(tiny_model, tmp_path, capsys, monkeypatch):
    save_single_file(tiny_model, tmp_path / "tiny.safetensors")
    monkeypatch.setattr("ldm.single_file.read_preset", lambda name: read_preset("tiny"))  # not inferable: say it
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    options = ["--prompt-file", tmp_path / "prompts.txt", "--steps", "1", "--outdir", tmp_path / "out"]
    code, out, _ = run(capsys, "--model", tmp_path / "tiny.safetensors", *options)
    assert code == 0 and out.splitlines()[-1].startswith("wrote 2 image(s)")
    prompts = [Image.open(p).text["prompt"] for p in sorted((tmp_path / "out").glob("0000?-*[0-9].png"))]
    assert prompts == ["a red circle", "a blue square"]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "one of --prompt, --prompt-file or --from-png is required"),
        (["--prompt", "x", "--height", "500"], "height=500: must be a positive multiple of 8"),
        (
            ["--prompt", "x", "--scheduler", "euler-a"],
            "argument --scheduler: invalid choice: 'euler-a' (choose from {})".format(", ".join(map(repr, SCHEDULERS))),
        ),
        (["--prompt", "x", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (
            ["--prompt", "x", "--init-image", "{tmp}/missing.png"],
            "--init-image {tmp}/missing.png: no such file",
        ),
        (
            ["--prompt", "x", "--init-image", "{tmp}/notes.txt"],
            "--init-image {tmp}/notes.txt: unreadable image (UnidentifiedImageError: not a format PIL reads)",
        ),
        (
            ["--prompt", "x", "--strength", "2", "--init-image", "{tmp}/photo.png"],
            "strength=2.0: must be 0 to 1",
        ),
        (["--prompt", "x", "--device", "tpu"], "device='tpu': use one of auto, cuda, cuda:N, mps, cpu"),
        (["--prompt-file", "{tmp}/empty.txt"], "--prompt-file {tmp}/empty.txt: no prompts in it"),
        (
            ["--prompt", "x", "--lora", "{tmp}/missing.safetensors:0.5"],
            "--lora {tmp}/missing.safetensors: no such file",
        ),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, argv, message):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.txt").write_text("\n")
    Image.new("RGB", (16, 16)).save(tmp_path / "photo.png")
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, "--model", tiny_model_dir, "--outdir", tmp_path / "out", *argv)
    assert code == 2 and no_report(out)
    assert err == f"sample.py: error: {message.format(tmp=tmp_path)}\n"
    assert not (tmp_path / "out").exists()


def test_a_lora_is_merged_and_recorded_by_name_and_hash_and_found_again_by_from_png(tiny_model_dir, tmp_path, capsys):
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    weights = {f"{layer}.lora_down.weight": torch.ones(1, 8), f"{layer}.lora_up.weight": torch.ones(8, 1)}
    (tmp_path / "Lora").mkdir()  # as A1111's models/Lora
    save_file(weights, tmp_path / "Lora" / "style.safetensors")
    shutil.copytree(tiny_model_dir, tmp_path / "tiny")
    options = ["--model", tiny_model_dir, "--prompt", "a red circle", "--steps", "2", "--seed", "0"]
    assert run(capsys, *options, "--outdir", tmp_path / "plain")[0] == 0
    assert (
        run(
            capsys, *options, "--outdir", tmp_path / "lora", "--lora", f"{tmp_path / 'Lora' / 'style.safetensors'}:0.5"
        )[0]
        == 0
    )
    plain, styled = Image.open(tmp_path / "plain" / "00000-0.png"), Image.open(tmp_path / "lora" / "00000-0.png")
    digest = model_hash(tmp_path / "Lora" / "style.safetensors")
    assert (styled.text["lora"], styled.text["lora_hashes"]) == ("style.safetensors:0.5", f"style.safetensors:{digest}")
    assert str(tmp_path) not in json.dumps(styled.text)
    assert styled.text["parameters"].endswith(', Lora: "style:0.5"')  # quoted as A1111 quotes
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(styled, dtype=int)).max() > 0
    again = ["--models-dir", tmp_path, "--from-png", tmp_path / "lora" / "00000-0.png", "--outdir", tmp_path / "again"]
    assert run(capsys, *again)[0] == 0  # the model in tmp_path, the LoRA in its Lora/ subfolder
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "00000-0.png")), np.asarray(styled))
    (tmp_path / "Lora" / "style.safetensors").unlink()
    code, _, err = run(capsys, *again[:-1], tmp_path / "none")
    assert code == 2 and f"drawn with the LoRA style.safetensors [{digest}], which is not in " in err


def test_an_outdir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    code, _, err = run(capsys, "--model", tmp_path / "nowhere", "--prompt", "x", "--outdir", tmp_path / "taken")
    assert code == 2 and err == f"sample.py: error: --outdir {tmp_path / 'taken'}: exists and is not a folder\n"
    assert (tmp_path / "taken").read_text() == "mine"


def test_a_missing_model_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "--model", tmp_path / "nowhere", "--prompt", "x")
    assert code == 2 and err == f"sample.py: error: --model {tmp_path / 'nowhere'}: no such file or folder\n"


def test_without_a_model_the_shipped_default_is_used(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "DEFAULT_MODEL", tiny_model_dir)
    code, out, _ = run(capsys, "--prompt", "a red circle", "--steps", "1", "--outdir", tmp_path)
    assert code == 0 and out.splitlines()[-1].startswith("wrote 1 image(s)")
    assert Image.open(tmp_path / next(p.name for p in tmp_path.glob("*.png"))).text["model"] == "tiny"


def test_without_a_model_it_says_none_is_installed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "DEFAULT_MODEL", tmp_path / "models" / "default")
    code, _, err = run(capsys, "--prompt", "x")
    assert code == 2 and err == "sample.py: error: no default model is installed yet; pass --model PATH_OR_HUB_ID\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "x", "--strength", "0.5"], "--strength needs --init-image: it says how far to move from that "
                                                 "picture"),
        (["--prompt", "x", "--seed", "-2"], "seed=-2: use a seed of 0 to 4294967295, as A1111 writes them, or -1 "
                                            "for a random one"),
        (
            ["--prompt", "x", "--lora", "{tmp}/style.safetensors:abc"],
            "argument --lora: {tmp}/style.safetensors:abc: 'abc' is not a scale (write FILE or FILE:0.8)",
        ),
        (["--prompt", "a (red:1.2.3) circle"], "('1.2.3' is not a number: write a weight as (word:1.2)"),
        (["--prompt", "x", "--emphasis", "loud"], "argument --emphasis: invalid choice: 'loud' (choose from "
                                                  "'original', 'no-norm', 'comfy', 'none')"),
        (
            ["--from-png", "{tmp}/style.safetensors"],
            "--from-png {tmp}/style.safetensors: unreadable image (UnidentifiedImageError: not a format PIL reads)",
        ),
        (["--prompt", "x", "--crop-top-left", "0", "8"], "crop_top_left: only SDXL models take size conditioning"),
        (["--prompt", "x", "--embeddings", "{tmp}/nowhere"], "--embeddings {tmp}/nowhere: no such folder"),
        (["--prompt", "x", "--embeddings", "{tmp}/bad"], "embedding {tmp}/bad/x.pt: not readable (not a PyTorch "
                                                         "or safetensors file)"),
    ],
)  # fmt: skip
def test_more_bad_arguments_give_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, argv, message):
    (tmp_path / "style.safetensors").write_bytes(b"not used")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.pt").write_bytes(b"not an embedding")  # read when the prompt names it
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, "--model", tiny_model_dir, "--outdir", tmp_path / "out", *argv)
    assert (code, err) == (2, f"sample.py: error: {message.format(tmp=tmp_path)}\n") and no_report(out)
    assert not (tmp_path / "out").exists()


def test_an_unwritable_outdir_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(TextToImagePipeline, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "file").write_text("mine")
    for outdir, reason in [(tmp_path / "file" / "run", "Not a directory"), (Path("/proc/ldm-run"), None)]:
        code, _, err = run(capsys, "--model", tiny_model_dir, "--prompt", "x", "--outdir", outdir)
        assert code == 2 and err.startswith(f"sample.py: error: --outdir {outdir}: cannot write there (")
        assert reason is None or reason in err
        assert err.count("\n") == 1


def test_each_image_is_on_disk_when_done_and_ctrl_c_keeps_them(tiny_model_dir, tmp_path, capsys, monkeypatch):
    batches = []
    original = TextToImagePipeline._generate_batch

    def interrupted_at_the_third(self, *args):
        batches.append(sorted(p.name for p in tmp_path.glob("*.png")))  # what is on disk before each batch
        if len(batches) == 3:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(TextToImagePipeline, "_generate_batch", interrupted_at_the_third)
    options = ["--prompt", "a red circle", "--num-images", "5", "--steps", "1", "--seed", "0"]
    code, out, err = run(capsys, "--model", tiny_model_dir, *options, "--outdir", tmp_path)
    assert code == 130 and no_report(out)
    last_line = err.rstrip("\n").replace("\r", "\n").splitlines()[-1]  # after the progress bars
    assert last_line == f"sample.py: interrupted; 2 finished image(s) kept in {tmp_path}"
    assert batches == [[], ["00000-0.png"], ["00000-0.png", "00001-1.png"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-0.png", "00001-1.png", "manifest.jsonl"]  # no grid
    assert [entry["file"] for entry in read_manifest(tmp_path)] == ["00000-0.png", "00001-1.png"]
    assert Image.open(tmp_path / "00001-1.png").text["seed"] == "1"


def test_from_png_draws_the_same_image_again(tiny_model_dir, tmp_path, capsys):
    options = ["--prompt", "a (red:1.3) circle, BREAK on grey", "--negative-prompt", "blue, square",
               "--seed", "3", "--steps", "3", "--scheduler", "euler-ancestral", "--guidance-scale", "4",
               "--emphasis", "comfy"]  # fmt: skip
    assert run(capsys, "--model", tiny_model_dir, *options, "--outdir", tmp_path / "first")[0] == 0
    first = tmp_path / "first" / "00000-3.png"
    assert (
        run(capsys, "--models-dir", tiny_model_dir.parent, "--from-png", first, "--outdir", tmp_path / "again")[0] == 0
    )
    again = tmp_path / "again" / "00000-3.png"
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert Image.open(again).text == Image.open(first).text
    assert (
        run(
            capsys,
            "--models-dir",
            tiny_model_dir.parent,
            "--from-png",
            first,
            "--seed",
            "4",
            "--outdir",
            tmp_path / "other",
        )[0]
        == 0
    )  # flags win
    assert Image.open(tmp_path / "other" / "00000-4.png").text["prompt"] == "a (red:1.3) circle, BREAK on grey"


def test_a_png_records_the_models_name_and_hash_and_from_png_finds_it_by_either(tiny_model_dir, tmp_path, capsys):
    """Issue 42: the `model` key held the model's absolute path (the user's folders). Now the name and
    hash, as A1111 records them; --from-png finds the model beside the shipped one or in --models-dir,
    by name and hash, by hash alone once renamed, or says which model it needs."""
    home = tmp_path / "home" / "alice" / "models"
    shutil.copytree(tiny_model_dir, home / "tiny-v2")
    argv = ["--model", home / "tiny-v2", "--prompt", "a red circle", "--seed", "3", "--steps", "2"]
    assert run(capsys, *argv, "--outdir", tmp_path / "first")[0] == 0
    first = tmp_path / "first" / "00000-3.png"
    with Image.open(first) as image:
        chunks, pixels = dict(image.text), np.asarray(image)
    short = model_hash(tiny_model_dir)
    assert (chunks["model"], chunks["model_hash"]) == ("tiny-v2", short)
    assert "alice" not in json.dumps(chunks) and "Model hash: " + short + ", Model: tiny-v2" in chunks["parameters"]

    code, _, err = run(capsys, "--from-png", first, "--outdir", tmp_path / "no")
    assert code == 2 and err == (
        f"sample.py: error: --from-png {first}: drawn with the model tiny-v2 [{short}], which is not in "
        f"{Path(sample.__file__).resolve().parent / 'models'}; pass --model PATH or --models-dir DIR\n"
    )
    assert run(capsys, "--models-dir", home, "--from-png", first, "--outdir", tmp_path / "named")[0] == 0
    (home / "tiny-v2").rename(home / "renamed")
    assert run(capsys, "--models-dir", home, "--from-png", first, "--outdir", tmp_path / "hashed")[0] == 0
    for folder in ("named", "hashed"):
        with Image.open(tmp_path / folder / "00000-3.png") as image:
            assert np.array_equal(np.asarray(image), pixels) and image.text["model"] in ("tiny-v2", "renamed")


def test_from_png_finds_an_a1111_pngs_model_by_name_and_warns_when_its_hash_differs(tiny_model_dir, tmp_path, capsys):
    """A1111 names its model by stem ("Model: tiny") and 10-digit hash; a file of that name whose hash
    differs is used, with a warning that the picture may differ."""
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 2, Sampler: Euler, CFG scale: 3, Seed: 5, Size: 16x16, "
                                "Model hash: 0123456789, Model: tiny")  # fmt: skip
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    argv = ["--models-dir", tiny_model_dir.parent, "--from-png", tmp_path / "a1111.png", "--outdir", tmp_path / "out"]
    with pytest.warns(
        UserWarning, match=rf"has the model's name but hash {model_hash(tiny_model_dir)}, not 0123456789"
    ):
        assert run(capsys, *argv)[0] == 0
    assert Image.open(tmp_path / "out" / "00000-5.png").text["model"] == "tiny"


def test_from_png_reads_an_a1111_infotext(tiny_model_dir, tmp_path, capsys):
    info = PngInfo()
    parameters = (
        "a red circle\nNegative prompt: blue\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 3, "
        "Seed: 5, Size: 16x16, Model hash: 0123456789, Model: sd15, Emphasis: No norm"
    )
    info.add_text("parameters", parameters)
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    assert (
        run(capsys, "--model", tiny_model_dir, "--from-png", tmp_path / "a1111.png", "--outdir", tmp_path / "out")[0]
        == 0
    )
    text = Image.open(tmp_path / "out" / "00000-5.png").text
    assert {k: text[k] for k in ("prompt", "negative_prompt", "steps", "scheduler", "guidance_scale", "emphasis")} == {
        "prompt": "a red circle", "negative_prompt": "blue", "steps": "2", "scheduler": "dpm++2m-karras",
        "guidance_scale": "3.0", "emphasis": "no-norm",
    }  # fmt: skip


def test_seed_minus_one_is_random_and_recorded(tiny_model_dir, tmp_path, capsys):
    assert (
        run(capsys, "--model", tiny_model_dir, "--prompt", "x", "--steps", "1", "--seed", "-1", "--outdir", tmp_path)[0]
        == 0
    )
    (image,) = tmp_path.glob("*.png")
    seed = int(Image.open(image).text["seed"])
    assert seed >= 0 and image.name == f"00000-{seed}.png"


def test_a_models_sampling_defaults_apply_unless_the_command_line_says(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "sampling.json").write_text(json.dumps({"steps": 3, "guidance_scale": 2.5}))
    assert run(capsys, "--model", model, "--prompt", "x", "--seed", "0", "--outdir", tmp_path / "a")[0] == 0
    text = Image.open(tmp_path / "a" / "00000-0.png").text
    assert (text["steps"], text["guidance_scale"]) == ("3", "2.5")
    assert (
        run(capsys, "--model", model, "--prompt", "x", "--seed", "0", "--steps", "2", "--outdir", tmp_path / "b")[0]
        == 0
    )
    assert Image.open(tmp_path / "b" / "00000-0.png").text["steps"] == "2"


def test_emphasis_other_than_original_is_recorded_as_a1111_names_it(tiny_model_dir, tmp_path, capsys):
    options = ["--prompt", "a (red) circle", "--steps", "1", "--seed", "0", "--emphasis", "no-norm"]
    assert run(capsys, "--model", tiny_model_dir, *options, "--outdir", tmp_path)[0] == 0
    text = Image.open(tmp_path / "00000-0.png").text
    assert text["emphasis"] == "no-norm" and text["parameters"].endswith(", Emphasis: No norm")
    options[1] = "a red circle"  # no brackets: A1111 leaves the field out
    assert run(capsys, "--model", tiny_model_dir, *options, "--outdir", tmp_path)[0] == 0
    assert "Emphasis" not in Image.open(tmp_path / "00001-0.png").text["parameters"]


def test_sdxl_size_conditioning_from_the_command_line_is_recorded_and_drawn_again(tiny_sdxl_dir, tmp_path, capsys):
    options = ["--prompt", "a red circle", "--seed", "5", "--steps", "3", "--original-size", "48", "32",
               "--crop-top-left", "0", "8", "--negative-original-size", "8", "8",
               "--negative-target-size", "16", "16", "--prompt-2", "a blue square"]  # fmt: skip
    assert run(capsys, "--model", tiny_sdxl_dir, *options, "--outdir", tmp_path / "first")[0] == 0
    first = tmp_path / "first" / "00000-5.png"
    text = Image.open(first).text
    assert (text["original_size"], text["crop_top_left"], text["target_size"]) == ("48,32", "0,8", "16,16")
    assert (text["negative_original_size"], text["negative_crop_top_left"]) == ("8,8", "0,0")
    assert text["prompt_2"] == "a blue square" and "negative_prompt_2" not in text
    assert (
        run(capsys, "--models-dir", tiny_sdxl_dir.parent, "--from-png", first, "--outdir", tmp_path / "again")[0] == 0
    )
    again = tmp_path / "again" / "00000-5.png"
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert Image.open(again).text == text
    assert run(capsys, "--model", tiny_sdxl_dir, *options[:6], "--outdir", tmp_path / "plain")[0] == 0
    plain = np.asarray(Image.open(tmp_path / "plain" / "00000-5.png")).astype(int)
    assert np.abs(plain - np.asarray(Image.open(first)).astype(int)).max() > 2


def test_an_embedding_beside_the_model_is_used_recorded_and_required_by_from_png(tiny_model_dir, tmp_path, capsys):
    """A1111's embeddings folder: the word `rose` reads the file's vectors; the PNG records A1111's
    `TI hashes`; --from-png draws it again, and stops if the embedding is not there."""
    from ldm.embeddings import save_embedding

    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir, model)
    (tmp_path / "models" / "embeddings").mkdir()
    save_embedding(tmp_path / "models" / "embeddings" / "rose.safetensors", [torch.randn(2, 8) * 50])
    (tmp_path / "empty").mkdir()
    options = ["--model", model, "--prompt", "a rose circle", "--seed", "1", "--steps", "4", "--guidance-scale", "9"]
    assert run(capsys, *options, "--outdir", tmp_path / "a")[0] == 0
    assert run(capsys, *options, "--embeddings", tmp_path / "empty", "--outdir", tmp_path / "text")[0] == 0
    first = tmp_path / "a" / "00000-1.png"
    digest = hashlib.sha256((tmp_path / "models" / "embeddings" / "rose.safetensors").read_bytes()).hexdigest()
    assert f'TI hashes: "rose: {digest[:12]}"' in Image.open(first).text["parameters"]
    as_text = np.asarray(Image.open(tmp_path / "text" / "00000-1.png"))
    assert not np.array_equal(np.asarray(Image.open(first)), as_text)
    assert run(capsys, "--models-dir", tmp_path / "models", "--from-png", first, "--outdir", tmp_path / "again")[0] == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(tmp_path / "again" / "00000-1.png")))
    code, _, err = run(
        capsys,
        "--models-dir",
        tmp_path / "models",
        "--from-png",
        first,
        "--embeddings",
        tmp_path / "empty",
        "--outdir",
        tmp_path / "no",
    )
    assert code == 2 and f"the image used the embedding 'rose' [{digest[:12]}]: not in" in err
    assert err.count("\n") == 1 and not (tmp_path / "no").exists()


def test_an_a1111_prompt_with_an_embedding_prompt_editing_and_hires_fix(tiny_model_dir, tmp_path, capsys):
    """The issue's case: A1111's infotext (an embedding, [a:b:0.5], the hires fix) read by --from-png,
    and written back with A1111's keys in A1111's order (modules/processing.py, create_infotext)."""
    from ldm.embeddings import save_embedding

    (tmp_path / "embeddings").mkdir()
    save_embedding(tmp_path / "embeddings" / "rose.safetensors", [torch.randn(2, 8)])
    digest = hashlib.sha256((tmp_path / "embeddings" / "rose.safetensors").read_bytes()).hexdigest()[:12]
    parameters = (
        "a rose [circle:square:0.5]\nNegative prompt: blue\nSteps: 4, Sampler: Euler a, Schedule type: Automatic, "
        "CFG scale: 7, Seed: 3, Size: 16x16, Model hash: 0123456789, Model: tiny, Denoising strength: 0.6, "
        f'Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent, TI hashes: "rose: {digest}", Version: v1.10.1'
    )
    info = PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    argv = ["--model", tiny_model_dir, "--embeddings", tmp_path / "embeddings", "--from-png", tmp_path / "a1111.png"]
    assert run(capsys, *argv, "--outdir", tmp_path / "out")[0] == 0
    image = Image.open(tmp_path / "out" / "00000-3.png")
    assert image.size == (32, 32)
    ours = image.text["parameters"]
    assert ours.splitlines()[:2] == ["a rose [circle:square:0.5]", "Negative prompt: blue"]
    keys = [
        pair.split(": ")[0] for pair in re.findall(r'(?:^|, )([A-Za-z ]+: (?:"[^"]*"|[^,]*))', ours.splitlines()[2])
    ]
    wanted = ["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model", "Denoising strength",
              "Hires upscale", "Hires steps", "Hires upscaler", "TI hashes"]  # fmt: skip
    assert [key for key in keys if key in wanted] == wanted
    assert f'TI hashes: "rose: {digest}"' in ours and "Hires upscale: 2" in ours and "Denoising strength: 0.6" in ours


@pytest.fixture
def controlnet_dir(tiny_model_dir, tmp_path):
    from conftest import perturb
    from ldm.controlnet import ControlNet
    from ldm.model import LatentDiffusion

    controlnet = perturb(ControlNet.from_unet(LatentDiffusion.load(tiny_model_dir).unet, 2), seed=4)
    controlnet.save(tmp_path / "controlnet")
    square = Image.new("RGB", (32, 32))
    square.paste((255, 255, 255), (8, 8, 24, 24))
    square.save(tmp_path / "control.png")
    return tmp_path / "controlnet"


def test_a_controlnet_draws_records_and_draws_again_from_png(tiny_model_dir, controlnet_dir, tmp_path, capsys):
    """sample.py --controlnet: the API's picture; sd-webui-controlnet's infotext unit; --from-png
    needs the control image again (a PNG does not carry it) and then gives the same picture."""
    from ldm.controlnet import ControlNet
    from pipelines.control import Control, preprocess

    control = ["--controlnet", controlnet_dir, "--control-image", tmp_path / "control.png", "--control-scale", "0.8",
               "--control-end", "0.5", "--control-preprocess", "canny"]  # fmt: skip
    options = ["--model", tiny_model_dir, "--prompt", "a red circle", "--seed", "2", "--steps", "4"]
    assert run(capsys, *options, *control, "--outdir", tmp_path / "a")[0] == 0
    first = Image.open(tmp_path / "a" / "00000-2.png")
    digest = hashlib.sha256((controlnet_dir / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:8]
    assert (
        f'ControlNet 0: "Module: canny, Model: controlnet [{digest}], Weight: 0.8, Resize Mode: Just Resize, '
        "Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 0.5, Pixel Perfect: True, "
        'Control Mode: Balanced"' in first.text["parameters"]
    )
    pipe = TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu")
    unit = Control(
        ControlNet.load(controlnet_dir), preprocess(Image.open(tmp_path / "control.png"), "canny"), 0.8, 0, 0.5
    )
    expected = pipe("a red circle", seed=2, steps=4, control=[unit], progress=False)[0]
    assert np.array_equal(np.asarray(first), np.asarray(expected))
    assert str(tmp_path) not in first.text["controlnet"]  # by name and hash
    png = [
        "--models-dir",
        tiny_model_dir.parent,
        "--models-dir",
        tmp_path,
        "--from-png",
        tmp_path / "a" / "00000-2.png",
    ]
    code, _, err = run(capsys, *png, "--outdir", tmp_path / "b")
    assert code == 2 and "drawn with 1 ControlNet(s); pass the control image(s) with --control-image" in err
    again = [*png, "--control-image", tmp_path / "control.png"]
    assert run(capsys, *again, "--outdir", tmp_path / "c")[0] == 0
    assert np.array_equal(np.asarray(first), np.asarray(Image.open(tmp_path / "c" / "00000-2.png")))


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--controlnet given 1 time(s), --control-image 0: one image each"),
        (["--control-image", "{tmp}/control.png", "--control-scale", "1", "--control-scale", "2"],
         "--control-scale: give it once, or once per --controlnet (1)"),
        (["--control-image", "{tmp}/control.png", "--control-start", "0.6", "--control-end", "0.5"],
         "needs scale >= 0 and 0 <= start < end <= 1 (got 1.0, 0.6, 0.5)"),
    ],
)  # fmt: skip
def test_controlnet_mistakes_are_one_line(tiny_model_dir, controlnet_dir, tmp_path, capsys, extra, message):
    argv = ["--model", tiny_model_dir, "--prompt", "x", "--controlnet", controlnet_dir, "--outdir", tmp_path / "out"]
    code, out, err = run(capsys, *argv, *[str(a).format(tmp=tmp_path) for a in extra])
    assert code == 2 and message in err and err.count("\n") == 1 and no_report(out)
    code, _, err = run(capsys, "--model", tiny_model_dir, "--prompt", "x", "--controlnet", tmp_path / "control.png",
                       "--control-image", tmp_path / "control.png")  # fmt: skip
    assert code == 2 and "neither a diffusers folder (config.json) nor a .safetensors/.pth/.ckpt file" in err


def test_an_a1111_controlnet_unit_is_read_and_its_folder_asked_for(tiny_model_dir, controlnet_dir, tmp_path, capsys):
    """sd-webui-controlnet's unit (its parse_unit reading): weight, guidance start and end, module."""
    unit = ("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.6, Resize Mode: Crop and Resize, "
            "Low Vram: False, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.1, "
            "Guidance End: 0.9, Pixel Perfect: False, Control Mode: Balanced")  # fmt: skip
    info = PngInfo()
    info.add_text(
        "parameters", f'a square\nSteps: 3, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 16x16, ControlNet 0: "{unit}"'
    )
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    argv = [
        "--model",
        tiny_model_dir,
        "--from-png",
        tmp_path / "a1111.png",
        "--control-image",
        tmp_path / "control.png",
    ]
    code, _, err = run(capsys, *argv, "--outdir", tmp_path / "no")
    assert code == 2 and "drawn with the ControlNet control_v11p_sd15_canny [d14c016b], which is not in " in err
    assert run(capsys, *argv, "--controlnet", controlnet_dir, "--outdir", tmp_path / "out")[0] == 0
    text = Image.open(tmp_path / "out" / "00000-1.png").text["parameters"]
    assert "Module: canny" in text and "Weight: 0.6" in text and "Guidance Start: 0.1, Guidance End: 0.9" in text


def test_an_original_single_file_controlnet_draws_what_its_folder_draws(
    tiny_model_dir, controlnet_dir, tmp_path, capsys
):
    from ldm.controlnet import ControlNet

    ControlNet.load(controlnet_dir).save_single_file(tmp_path / "control_tiny.safetensors")
    options = ["--model", tiny_model_dir, "--prompt", "a circle", "--seed", "1", "--steps", "3", "--control-image",
               tmp_path / "control.png"]  # fmt: skip
    assert run(capsys, *options, "--controlnet", controlnet_dir, "--outdir", tmp_path / "a")[0] == 0
    assert (
        run(capsys, *options, "--controlnet", tmp_path / "control_tiny.safetensors", "--outdir", tmp_path / "b")[0] == 0
    )
    first, second = (np.asarray(Image.open(tmp_path / d / "00000-1.png")) for d in ("a", "b"))
    assert np.array_equal(first, second)
