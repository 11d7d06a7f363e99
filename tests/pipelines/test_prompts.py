import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.text import clip_tokenizer, encode_prompts
from pipelines.prompts import encode_weighted, parse_emphasis


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a red circle", [("a red circle", 1.0)]),
        ("a (red) circle", [("a ", 1.0), ("red", 1.1), (" circle", 1.0)]),
        ("a [red] circle", [("a ", 1.0), ("red", 1 / 1.1), (" circle", 1.0)]),
        ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
        ("((red)) circle", [("red", 1.1 * 1.1), (" circle", 1.0)]),
        ("((red:0.5) and blue)", [("red", 0.5 * 1.1), (" and blue", 1.1)]),
        (r"a \(red\) circle", [("a (red) circle", 1.0)]),
        ("a (red circle", [("a ", 1.0), ("red circle", 1.1)]),  # unclosed: to the end
        ("time: 3 o'clock", [("time: 3 o'clock", 1.0)]),  # a colon outside brackets is text
        ("", [("", 1.0)]),
    ],
)
def test_emphasis_syntax_of_web_uis(prompt, expected):
    parsed = parse_emphasis(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return clip_tokenizer(), CLIPTextModel(config).eval()


def test_a_prompt_without_brackets_is_exactly_the_plain_embedding(text_model):
    tokenizer, encoder = text_model
    prompts = ["a large red circle in the top left", ""]
    with torch.no_grad():
        assert torch.equal(encode_weighted(tokenizer, encoder, prompts), encode_prompts(tokenizer, encoder, prompts))


def test_emphasis_scales_the_word_then_restores_the_mean(text_model):
    tokenizer, encoder = text_model
    with torch.no_grad():
        plain = encode_weighted(tokenizer, encoder, ["a red circle"])[0]
        emphasised = encode_weighted(tokenizer, encoder, ["a (red:1.5) circle"])[0]
    scaled = plain.clone()
    scaled[2] *= 1.5  # token 2 is "red" (0 is the start token)
    torch.testing.assert_close(emphasised, scaled * plain.mean() / scaled.mean())


def test_a_long_prompt_is_encoded_in_77_token_chunks(text_model):
    tokenizer, encoder = text_model
    words = " ".join(["red circle"] * 50)  # 100 tokens: two chunks
    ids = tokenizer(words, add_special_tokens=False).input_ids
    assert len(ids) == 100
    with torch.no_grad():
        embeddings = encode_weighted(tokenizer, encoder, [words, "blue"])
        first = encoder(torch.tensor([[49406, *ids[:75], 49407]])).last_hidden_state
        second = encoder(torch.tensor([[49406, *ids[75:], 49407] + [49407] * 50])).last_hidden_state
    assert embeddings.shape == (2, 154, 16)
    torch.testing.assert_close(embeddings[0, :77], first[0])
    torch.testing.assert_close(embeddings[0, 77:], second[0])
    with torch.no_grad():  # the short prompt is padded with an empty chunk
        empty = encode_prompts(tokenizer, encoder, [""])
    torch.testing.assert_close(embeddings[1, 77:], empty[0])


def test_truncation_warns_with_the_words_it_cut(text_model):
    tokenizer, encoder = text_model
    prompt = " ".join(["red"] * 75) + " blue square"
    with pytest.warns(UserWarning, match="dropped: 'blue square'"), torch.no_grad():
        embeddings = encode_weighted(tokenizer, encoder, [prompt], truncate=True)
    assert embeddings.shape == (1, 77, 16)


def test_a_shorter_context_chunks_at_its_own_length(text_model):
    _, encoder = text_model
    tokenizer = clip_tokenizer(model_max_length=24)  # 22 prompt tokens per chunk
    words = " ".join(["red circle"] * 15)  # 30 tokens: two chunks
    ids = tokenizer(words, add_special_tokens=False).input_ids
    with torch.no_grad():
        embeddings = encode_weighted(tokenizer, encoder, [words])
        second = encoder(torch.tensor([[49406, *ids[22:], 49407] + [49407] * 14])).last_hidden_state
        plain = encode_prompts(tokenizer, encoder, ["a red circle"])
    assert embeddings.shape == (1, 48, 16) and plain.shape == (1, 24, 16)
    torch.testing.assert_close(embeddings[0, 24:], second[0])
