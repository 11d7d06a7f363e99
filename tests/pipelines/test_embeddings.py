"""Textual-inversion embeddings: the file formats A1111 and diffusers write, A1111's placement rules
(modules/sd_hijack_clip.py `tokenize_line` at 5ad03e65; textual_inversion.py at 22ecb78b), and the
same conditioning as diffusers 0.42.1's `load_textual_inversion`."""

import copy
import warnings
from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from ldm.embeddings import EmbeddingError, read_embedding, save_embedding
from ldm.model import LatentDiffusion
from pipelines.embeddings import EmbeddingFolder, check_hashes
from pipelines.prompts import encode_weighted, split_into_chunks
from pipelines.settings import GenerationConfig
from pipelines.text_to_image import TextToImagePipeline

WIDTH = 8  # the tiny model's text width


def vectors(count: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def a1111_pt(path, tensor) -> None:
    """As A1111's Embedding.save writes it (textual_inversion.py at 22ecb78b)."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": tensor}, "name": path.stem, "step": 100,
            "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model"}  # fmt: skip
    torch.save(data, path)


def test_the_formats_people_have_load_to_the_same_vectors(tmp_path):
    tensor = vectors(3)
    a1111_pt(tmp_path / "pt.pt", tensor)
    save_file({"emb_params": tensor}, tmp_path / "ours.safetensors")
    save_file({"<token>": tensor[0].contiguous()}, tmp_path / "diffusers.safetensors")  # one 1-D vector
    torch.save({"<token>": tensor}, tmp_path / "learned_embeds.bin")
    save_file({"clip_l": tensor, "clip_g": vectors(3, 12)}, tmp_path / "sdxl.safetensors")
    for name in ("pt.pt", "ours.safetensors", "learned_embeds.bin"):
        embedding = read_embedding(tmp_path / name)
        assert embedding.count == 3 and torch.equal(embedding.vectors[""], tensor), name
    assert torch.equal(read_embedding(tmp_path / "diffusers.safetensors").vectors[""], tensor[:1])
    sdxl = read_embedding(tmp_path / "sdxl.safetensors")
    assert sdxl.for_encoder(0, 2, WIDTH) is sdxl.vectors["clip_l"] and sdxl.for_encoder(1, 2, 12).shape == (3, 12)
    assert sdxl.for_encoder(0, 1, 12) is sdxl.vectors["clip_g"]  # the SDXL refiner's one encoder
    assert sdxl.for_encoder(0, 1, 1024) is None and read_embedding(tmp_path / "pt.pt").for_encoder(0, 2, WIDTH) is None
    save_embedding(tmp_path / "again.safetensors", [tensor])
    assert torch.equal(read_embedding(tmp_path / "again.safetensors").vectors[""], tensor)


class Pickled:
    """Not a tensor: what a weights-only load must refuse."""


def test_a_file_with_more_than_tensors_or_no_embedding_is_refused_in_one_line(tmp_path):
    torch.save({"string_to_param": {"*": vectors(1)}, "extra": Pickled()}, tmp_path / "code.pt")
    torch.save({"a": vectors(1), "b": vectors(1)}, tmp_path / "two.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    cases = [("code.pt", r"holds \S*Pickled, not only tensors; refused"), ("two.pt", "not an embedding"),
             ("junk.safetensors", "not readable")]  # fmt: skip
    for name, message in cases:
        with pytest.raises(EmbeddingError, match=message) as error:
            read_embedding(tmp_path / name)
        assert "\n" not in str(error.value)


@pytest.fixture
def folder(tmp_path):
    save_embedding(tmp_path / "rose.safetensors", [vectors(2)])
    save_embedding(tmp_path / "big.safetensors", [vectors(10, seed=1)])
    save_embedding(tmp_path / "red circle.safetensors", [vectors(1, seed=2)])  # a name of two tokens
    save_embedding(tmp_path / "wide.safetensors", [vectors(1, 1024)])  # SD 2.x's width: not for this model
    return EmbeddingFolder(tmp_path)


def test_a_name_is_replaced_by_its_vectors_with_the_weight_of_its_piece(tiny_model, folder):
    tokenizer = tiny_model.tokenizer
    chunks = split_into_chunks(tokenizer, "a (rose:1.5) square, roses", "original", folder, [WIDTH])
    plain = split_into_chunks(tokenizer, "a (x:1.5) square, roses")
    assert chunks.ids[0][:6] == [plain.ids[0][0], plain.ids[0][1], 0, 0, *plain.ids[0][3:5]]
    assert chunks.weights[0][2:4] == [1.5, 1.5] and chunks.tokens[:3] == ["a", "rose", "rose"]
    assert [(c, p, e.name) for c, p, e in chunks.fixes] == [(0, 2, "rose")]  # "roses" is another token
    longest = split_into_chunks(tokenizer, "a red circle, red", "original", folder, [WIDTH])
    assert [(p, e.name) for _, p, e in longest.fixes] == [(2, "red circle")]


def test_an_embedding_is_never_split_across_chunks(tiny_model, folder):
    """70 tokens, then a 10-vector embedding: it starts the second chunk, as A1111's tokenize_line does."""
    tokenizer = tiny_model.tokenizer
    chunks = split_into_chunks(tokenizer, "x " * 70 + "big", "original", folder, [WIDTH])
    assert len(chunks.ids) == 2 and chunks.ids[0][71] == tokenizer.eos_token_id
    assert [(c, p) for c, p, _ in chunks.fixes] == [(1, 1)] and chunks.ids[1][1:11] == [0] * 10
    # the comma backtrack moves the text after a comma, an embedding with its vectors
    moved = split_into_chunks(tokenizer, "x " * 70 + ", rose " + "y " * 10, "original", folder, [WIDTH])
    assert [(c, p) for c, p, _ in moved.fixes] == [(1, 1)] and moved.ids[1][1:3] == [0, 0]


def test_an_embedding_that_does_not_fit_the_model_is_read_as_text(tiny_model, folder):
    with pytest.warns(UserWarning, match="'wide' .1024 wide. does not fit"):
        chunks = split_into_chunks(tiny_model.tokenizer, "a wide square", "original", folder, [WIDTH])
    assert chunks.fixes == [] and chunks.tokens == ["a", "wide", "square"]


def test_the_encoder_reads_the_vectors_in_place_of_the_tokens(tiny_model, folder):
    """The same output as an encoder whose token-embedding rows for two ids were set to the vectors."""
    encoders = tiny_model.text_encoders()
    ours = encode_weighted(encoders, "a rose square", embeddings=folder).text
    tokenizer, encoder = encoders[0]
    changed = copy.deepcopy(encoder)
    ids = split_into_chunks(tokenizer, "a rose square", "original", folder, [WIDTH]).ids[0]
    ids[2:4] = [1000, 1001]
    with torch.no_grad():
        changed.get_input_embeddings().weight[1000:1002] = folder.embedding("rose").vectors[""]
        expected = changed(torch.tensor([ids])).last_hidden_state
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("count", [1, 3])
def test_the_conditioning_equals_diffusers_load_textual_inversion(tiny_model_dir, tmp_path, count):
    """diffusers adds the token `<rosy>` (and `<rosy>_1`, ...) to the tokenizer and the vectors to the
    embedding matrix; A1111 and we put the vectors in place of the name's tokens: the same inputs."""
    tensor = vectors(count, seed=3)
    save_file({"<rosy>": tensor}, tmp_path / "<rosy>.safetensors")
    prompt = "a large <rosy> circle, blue square"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_textual_inversion(str(tmp_path / "<rosy>.safetensors"))
    theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    model = LatentDiffusion.load(tiny_model_dir)
    ours = encode_weighted(model.text_encoders(), prompt, embeddings=EmbeddingFolder(tmp_path)).text
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_sdxl_embeddings_give_each_encoder_its_vectors_as_diffusers_does(tiny_sdxl_dir, tmp_path):
    """SDXL: clip_l into the first encoder, clip_g into the second (diffusers' documented way: two
    load_textual_inversion calls). The token embeddings and the pooled text equal diffusers'."""
    clip_l, clip_g = vectors(2, 8, seed=4), vectors(2, 12, seed=5)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "<rosy>.safetensors")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_textual_inversion(clip_l, token="<rosy>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token="<rosy>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    prompt = "a <rosy> circle"
    text, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    model = LatentDiffusion.load(tiny_sdxl_dir)
    ours = encode_weighted(model.text_encoders(), prompt, penultimate=True, embeddings=EmbeddingFolder(tmp_path))
    torch.testing.assert_close(ours.text, text, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, atol=1e-6, rtol=1e-5)


def test_ti_hashes_name_each_embedding_used_as_a1111_writes_them(tiny_model_dir, folder):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu")
    pipe.load_embeddings(folder.folder)
    config = pipe.resolve(GenerationConfig(steps=4, negative_prompt="rose"), None, None)[0]
    rose, circle = folder.embedding("rose").short_hash, folder.embedding("red circle").short_hash
    assert len(rose) == 12
    assert pipe.ti_hashes("a [red circle:square:2] one", config) == f"red circle: {circle}, rose: {rose}"
    assert pipe.ti_hashes("a square", replace(config, negative_prompt="")) is None


def test_a_recorded_embedding_must_be_in_the_folder(folder):
    short = folder.embedding("rose").short_hash
    check_hashes(folder, f"rose: {short}")
    with pytest.raises(EmbeddingError, match=r"the image used the embedding 'lily' \[0123\]: not in"):
        check_hashes(folder, f"rose: {short}, lily: 0123")
    with pytest.raises(EmbeddingError, match="no embeddings folder; pass --embeddings DIR"):
        check_hashes(None, "rose: 0123")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_hashes(folder, "rose: 000000000000")
    assert "is not the file the image used [000000000000]" in str(caught[0].message)
