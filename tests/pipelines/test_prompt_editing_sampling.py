"""Prompt editing in the denoising loop: each step is conditioned on its prompts' text of that step
(A1111's `reconstruct_cond_batch`: step i, from 0, reads the first entry ending at or after i), each
distinct text is encoded once, and the negative prompt, SDXL and sample.py take it too."""

import numpy as np
import pytest
from PIL import Image

import pipelines.text_to_image as text_to_image
import sample
from pipelines.settings import GenerationError
from pipelines.text_to_image import TextToImagePipeline

SIZE = 16
OPTIONS = dict(steps=6, seed=3, height=SIZE, width=SIZE, scheduler="euler", progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")


def storage(tensor) -> int:
    """Where a tensor's numbers live: a batch's copies of one row (expanded) share it."""
    return tensor.untyped_storage().data_ptr()


@pytest.fixture
def spy(monkeypatch):
    """Which texts were encoded, and which texts conditioned each step (conditional, unconditional)."""
    encoded, steps, names = [], [], {}
    real_encode, real_predict = text_to_image.encode_batch, TextToImagePipeline._predict

    def encode(model, prompts, *args, **kwargs):
        result = real_encode(model, prompts, *args, **kwargs)
        encoded.append(tuple(prompts))
        names[storage(result.text)] = tuple(prompts)
        return result

    def predict(self, unet, x, t, text, *args):
        negative = None if text.unconditional is None else names.get(storage(text.unconditional.text), "zeros")
        steps.append((names[storage(text.conditional.text)], negative))
        return real_predict(self, unet, x, t, text, *args)

    monkeypatch.setattr(text_to_image, "encode_batch", encode)
    monkeypatch.setattr(TextToImagePipeline, "_predict", predict)
    return encoded, steps


def same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_each_step_reads_its_text_and_each_text_is_encoded_once(pipe, spy):
    encoded, steps = spy
    pipe("a [red:blue:3] circle", negative_prompt="[green::0.5]", **OPTIONS)
    assert [prompts for prompts, _ in steps] == [("a red circle",)] * 4 + [("a blue circle",)] * 2
    assert [negative for _, negative in steps] == [("green",)] * 4 + [("",)] * 2
    assert sorted(encoded) == [("",), ("a blue circle",), ("a red circle",), ("green",)]


def test_alternation_switches_every_step_and_encodes_two_texts(pipe, spy):
    encoded, steps = spy
    pipe(["[cat|dog] on a mat", "a bird"], guidance_scale=1.0, batch_size=2, **OPTIONS)
    assert [prompts for prompts, _ in steps] == [("cat on a mat", "a bird")] * 2 + [
        ("dog on a mat", "a bird"), ("cat on a mat", "a bird"), ("dog on a mat", "a bird"),
        ("cat on a mat", "a bird")]  # fmt: skip
    assert len(encoded) == 2


def test_an_edit_that_never_switches_draws_the_plain_prompt(pipe):
    plain = pipe("a red circle", **OPTIONS)[0]
    assert same(pipe("a [red:blue:1.0] circle", **OPTIONS)[0], plain)  # 1.0: the end of the steps
    assert same(pipe("a [blue:red:0] circle", **OPTIONS)[0], plain)  # 0: never before
    assert not same(pipe("a [red:blue:3] circle", **OPTIONS)[0], plain)


def test_attention_maps_refuse_an_edited_prompt(pipe):
    with pytest.raises(GenerationError, match="attention maps: not with prompt editing"):
        pipe("a [red|blue] circle", attention_maps=True, **OPTIONS)


def test_sdxl_takes_prompt_editing(tiny_sdxl_dir, spy):
    sdxl = TextToImagePipeline.from_pretrained(tiny_sdxl_dir, device="cpu", dtype="fp32")
    sdxl("a [red:blue:2] lighthouse", **OPTIONS)
    assert [prompts for prompts, _ in spy[1]] == [("a red lighthouse",)] * 3 + [("a blue lighthouse",)] * 3


def test_sample_py_records_the_prompt_as_written_and_draws_it_again(tiny_model_dir, tmp_path):
    argv = ["--model", str(tiny_model_dir), "--prompt", "a [red:blue:0.5] circle", "--steps", "4", "--seed", "1",
            "--device", "cpu"]  # fmt: skip
    assert sample.main([*argv, "--outdir", str(tmp_path / "a")]) == 0
    first = Image.open(tmp_path / "a" / "00000-1.png")
    assert first.text["prompt"] == "a [red:blue:0.5] circle"
    assert first.text["parameters"].startswith("a [red:blue:0.5] circle\n")
    again = ["--from-png", str(tmp_path / "a" / "00000-1.png"), "--model", str(tiny_model_dir), "--device", "cpu"]
    assert sample.main([*again, "--outdir", str(tmp_path / "b")]) == 0
    assert same(Image.open(tmp_path / "b" / "00000-1.png"), first)
