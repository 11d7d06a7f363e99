"""Textual inversion (stage=textual_inversion) on the tiny models: only the new word's vectors train,
the model is bit-identical after the run, the file is A1111's format and reads the same in
sample.py and in diffusers 0.42.1's `load_textual_inversion`."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from training.conftest import assert_model_unchanged, recipe

import sample
import train
from conftest import folder_hash
from ldm.embeddings import read_embedding
from ldm.model import LatentDiffusion
from ldm.train.config import load_config
from ldm.train.loop import Trainer
from ldm.train.textual_inversion import WordVectors, placed
from pipelines.embeddings import EmbeddingFolder
from pipelines.prompts import encode_weighted

TOKEN = "<rosy>"


@pytest.fixture(scope="module")
def rosy_images(four_images, tmp_path_factory):
    """The four shapes, their colour word replaced by the new word in every caption."""
    folder = tmp_path_factory.mktemp("rosy")
    for file in four_images.glob("0000[0-3].*"):
        if file.suffix == ".txt":
            words = file.read_text().split()
            words[2] = TOKEN  # "a small red circle ..." -> "a small <rosy> circle ..."
            (folder / file.name).write_text(" ".join(words))
        elif file.suffix == ".png":
            (folder / file.name).write_bytes(file.read_bytes())
    return folder


def inversion_recipe(tmp_path, data, model_dir, validation=None, **inversion):
    return recipe(
        tmp_path,
        data,
        stage="textual_inversion",
        model={"preset": None, "pretrained": str(model_dir)},
        textual_inversion={"token": TOKEN, "init_word": "red", "vectors": 2, **inversion},
        optim={"learning_rate": 5e-2},
        steps={"max": 4},
        checkpoint={"every": 2},
        diffusion={"caption_dropout": 0.0},
        ema_decay=None,
        validation=validation or {},
    )


def test_only_the_words_vectors_train_and_the_model_is_unchanged(tiny_model_dir, rosy_images, tmp_path):
    base = folder_hash(tiny_model_dir)
    validation = {"prompts": [f"a large {TOKEN} square"], "every": 4, "steps": 2}
    config = load_config(inversion_recipe(tmp_path, rosy_images, tiny_model_dir, validation=validation), [])
    trainer = Trainer(config, validate=train.sampler(config))  # the grid reads the word as it is now
    trainer.run()
    assert_model_unchanged(trainer, tiny_model_dir, base)
    trained = [p for m in trainer.wrapped for p in m.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in trained] == [(2, 8)]
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [f"{TOKEN}.safetensors", "checkpoints", "config.yaml", "validation"]
    assert set(load_file(run / f"{TOKEN}.safetensors")) == {"emb_params"}  # A1111's own key
    start = WordVectors(LatentDiffusion.load(tiny_model_dir).text_encoders(), "red", 2).vectors[0]
    assert not torch.equal(read_embedding(run / f"{TOKEN}.safetensors").vectors[""], start)
    assert (run / "validation" / "step-00000004.png").is_file()


def test_the_word_starts_as_its_init_words_vectors_spread_as_a1111_spreads_them(tiny_model):
    """A1111's create_embedding: vector i is the init text's token i * tokens // vectors."""
    ((tokenizer, encoder),) = tiny_model.text_encoders()
    ids = tokenizer("red blue", add_special_tokens=False).input_ids
    table = encoder.get_input_embeddings().weight
    word = WordVectors(tiny_model.text_encoders(), "red blue", 4).vectors[0]
    assert torch.equal(word, table[[ids[0], ids[0], ids[1], ids[1]]])


def test_captions_hold_the_words_places_where_it_is_written(tiny_model):
    tokenizer = tiny_model.tokenizer
    ids, rows = placed(tokenizer, [f"a {TOKEN} circle", "a circle"], TOKEN, 3)
    plain = tokenizer("a circle", add_special_tokens=False).input_ids
    assert ids[0, :6].tolist() == [tokenizer.bos_token_id, plain[0], 0, 0, 0, plain[1]]
    assert rows == [(0, 2)] and ids[1, 1:3].tolist() == plain


def test_the_file_reads_the_same_here_and_in_diffusers(tiny_model_dir, rosy_images, tmp_path):
    Trainer(load_config(inversion_recipe(tmp_path, rosy_images, tiny_model_dir), [])).run()
    file = tmp_path / "run" / f"{TOKEN}.safetensors"
    prompt = f"a large {TOKEN} circle"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_textual_inversion(str(file), token=TOKEN)
    theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    model = LatentDiffusion.load(tiny_model_dir)
    ours = encode_weighted(model.text_encoders(), prompt, embeddings=EmbeddingFolder(tmp_path / "run")).text
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_sdxl_learns_a_vector_set_per_text_encoder(tiny_sdxl_dir, rosy_images, tmp_path):
    path = inversion_recipe(tmp_path, rosy_images, tiny_sdxl_dir, vectors=1)
    Trainer(load_config(path, ["steps.max=2", "data.resolution=16"])).run()
    saved = load_file(tmp_path / "run" / f"{TOKEN}.safetensors")
    assert {key: tuple(value.shape) for key, value in saved.items()} == {"clip_l": (1, 8), "clip_g": (1, 12)}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["textual_inversion.token=null"], "textual_inversion.token=None: set the new word"),
        (["textual_inversion.vectors=0"], "textual_inversion.vectors=0: 1 to 75"),
        (["textual_inversion.token=<lily>"], "textual_inversion.token='<lily>': no caption in"),
        (["model.pretrained=null", "model.preset=tiny"], "stage=textual_inversion: teaches a trained model a word"),
    ],
)
def test_recipe_mistakes_are_one_line(tiny_model_dir, rosy_images, tmp_path, capsys, monkeypatch, overrides, message):
    monkeypatch.setattr("ldm.train.loop.build_model", lambda config: pytest.fail("the model was built"))
    path = inversion_recipe(tmp_path, rosy_images, tiny_model_dir)
    assert train.main(["--config", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("recipe_file", ["configs/textual-inversion.yaml", "configs/shapes-textual-inversion.yaml"])
def test_the_shipped_recipes_run_and_sample_py_reads_the_word(
    recipe_file, tiny_model_dir, rosy_images, tmp_path, capsys
):
    """Each recipe as the README runs it, made small; then `sample.py --embeddings` with its result."""
    run = tmp_path / "run"
    options = [f"data.path={rosy_images}", f"output_dir={run}", f"model.pretrained={tiny_model_dir}",
               f"textual_inversion.token={TOKEN}", "data.resolution=16", f"data.cache_dir={tmp_path / 'cache'}",
               "steps.max=2", "steps.mixed_precision=no", "report_to=none", "validation.prompts=[]"]  # fmt: skip
    assert train.main(["--config", recipe_file, *options]) == 0
    out = tmp_path / "out"
    argv = ["--model", tiny_model_dir, "--prompt", f"a {TOKEN} circle", "--steps", "2", "--embeddings", run]
    assert sample.main([str(a) for a in [*argv, "--seed", "0", "--outdir", out]]) == 0
    short = read_embedding(run / f"{TOKEN}.safetensors").short_hash
    assert f'TI hashes: "{TOKEN}: {short}"' in Image.open(out / "00000-0.png").text["parameters"]
