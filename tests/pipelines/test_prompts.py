"""Prompt syntax and encoding, checked against AUTOMATIC1111's parser and chunker as read in
modules/prompt_parser.py (commit 0674fabd) and modules/sd_hijack_clip.py (commit 00e09382), and
ComfyUI's weighting in comfy/sd1_clip.py (commit b55c2247)."""

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.text import clean_text, clip_tokenizer, encode_prompts
from pipelines.prompts import PromptError, encode_weighted, parse_emphasis, split_into_chunks

START, END = 49406, 49407


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
        # A1111's own doctests
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),  # fmt: skip
        # BREAK, as A1111 marks it: ("BREAK", -1) between the pieces around it
        ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
        ("BREAK a dog", [("", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
        ("a BREAKFAST", [("a BREAKFAST", 1.0)]),  # a word, not a BREAK
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # weighted: then A1111 reads it as text
        # a lone backslash is dropped; whitespace may stand on both sides of a weight (commit 28bd8e14)
        ("a \\ b", [("a  b", 1.0)]),
        ("(masterpiece: 1.2)", [("masterpiece", 1.2)]),
        ("(word:1.2 )", [("word", 1.2)]),
        ("(word :\t1.2\n)", [("word ", 1.2)]),
        ("16:9)", [("16:9)", 1.0)]),  # a weight with no open bracket is text
    ],
)
def test_emphasis_syntax_is_a1111s(prompt, expected):
    parsed = parse_emphasis(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


@pytest.mark.parametrize("prompt", ["(a:1.2.3)", "a (red:..) circle", "(x:-.)"])
def test_a_malformed_weight_is_a_prompt_error_naming_it(prompt):
    with pytest.raises(PromptError, match="is not a number"):
        parse_emphasis(prompt)


@pytest.mark.parametrize("prompt", ["(red:nan)", "(red:1e309)", "(red: -Inf )", "(red:2E3)", "(red:" + "9" * 400 + ")"])
def test_a_weight_that_is_not_a_finite_decimal_is_refused(prompt):
    with pytest.raises(PromptError, match="weight"):
        parse_emphasis(prompt)


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return clip_tokenizer(), CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def biased_text_model(text_model):
    """A final LayerNorm with a bias, as trained CLIP encoders have: the chunk mean is not zero."""
    tokenizer, encoder = text_model
    biased = CLIPTextModel(encoder.config).eval()
    biased.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        next(m for name, m in biased.named_modules() if name.endswith("final_layer_norm")).bias.fill_(0.3)
    return tokenizer, biased


def encode(model, prompt, **options):
    with torch.no_grad():
        return encode_weighted([model], prompt, **options).text[0]


def test_a_prompt_without_brackets_is_exactly_the_plain_embedding(text_model):
    for prompt in ["a large red circle in the top left", ""]:
        with torch.no_grad():
            plain = encode_prompts(*text_model, [prompt])[0]
        assert torch.equal(encode(text_model, prompt), plain)


def test_original_emphasis_scales_the_word_then_restores_the_chunk_mean(biased_text_model):
    plain = encode(biased_text_model, "a red circle")
    scaled = plain.clone()
    scaled[2] *= 1.5  # token 2 is "red" (0 is the start token)
    assert abs(plain.mean()) > 0.1
    emphasised = encode(biased_text_model, "a (red:1.5) circle")
    torch.testing.assert_close(emphasised, scaled * plain.mean() / scaled.mean())


def test_original_emphasis_skips_the_mean_where_it_is_about_zero(text_model):
    """A LayerNorm without bias gives a mean of ~1e-9: dividing by it gave NaN or scaled every token."""
    plain = encode(text_model, "a red circle")
    assert abs(plain.mean()) < 1e-6
    scaled = plain.clone()
    scaled[2] *= 1.5
    torch.testing.assert_close(encode(text_model, "a (red:1.5) circle"), scaled)


@pytest.mark.parametrize("mode", ["original", "no-norm", "comfy"])
@pytest.mark.parametrize("fixture", ["text_model", "biased_text_model"])
@pytest.mark.parametrize(
    "weighted, plain, word",
    [("a (red:1.5) circle", "a red circle", 2), ("a [[[red]]] circle", "a red circle", 2),
     ("(center:1.4)", "center", 1), ("a (red:0) circle", "a red circle", 2)],
)  # fmt: skip
def test_weighting_keeps_other_tokens_directions_and_finite_values(request, mode, fixture, weighted, plain, word):
    model = request.getfixturevalue(fixture)
    before, after = encode(model, plain), encode(model, weighted, emphasis=mode)
    assert torch.isfinite(after).all()
    others = [i for i in range(len(before)) if i != word]
    cosine = torch.nn.functional.cosine_similarity(after[others], before[others], dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))


def test_comfy_emphasis_moves_the_word_from_the_empty_prompts_embedding(text_model):
    plain, empty = encode(text_model, "a red circle"), encode(text_model, "")
    weighted = encode(text_model, "a (red:1.5) circle", emphasis="comfy")
    expected = plain.clone()
    expected[2] = empty[2] + 1.5 * (plain[2] - empty[2])
    torch.testing.assert_close(weighted, expected)


def test_emphasis_none_reads_brackets_as_text(text_model):
    tokenizer, _ = text_model
    chunks = split_into_chunks(tokenizer, "a (red:1.5) circle", emphasis="none")
    assert chunks.tokens == ["a", "(", "red", ":", "1", ".", "5", ")", "circle"]
    assert set(chunks.weights[0]) == {1.0}


def test_a_long_prompt_is_encoded_in_77_token_chunks(text_model):
    tokenizer, encoder = text_model
    words = " ".join(["red circle"] * 50)  # 100 tokens: two chunks
    ids = tokenizer(words, add_special_tokens=False).input_ids
    assert len(ids) == 100
    embeddings = encode(text_model, words)
    with torch.no_grad():
        first = encoder(torch.tensor([[START, *ids[:75], END]])).last_hidden_state
        second = encoder(torch.tensor([[START, *ids[75:], END] + [END] * 50])).last_hidden_state
    assert embeddings.shape == (154, 16)
    torch.testing.assert_close(embeddings[:77], first[0])
    torch.testing.assert_close(embeddings[77:], second[0])


def test_break_starts_a_new_chunk(text_model):
    tokenizer, _ = text_model
    chunks = split_into_chunks(tokenizer, "a red circle BREAK a blue square")
    first, second = (tokenizer(text, add_special_tokens=False).input_ids for text in ("a red circle", "a blue square"))
    assert [chunk[:5] for chunk in chunks.ids] == [[START, *first, END], [START, *second, END]]
    assert chunks.positions == [1, 2, 3, 78, 79, 80]
    assert split_into_chunks(tokenizer, "BREAK red").ids[0][:3] == [START, END, END]  # an empty first chunk


def test_a_long_prompt_breaks_at_the_last_comma_within_20_tokens(text_model):
    """70 words, a comma, 10 more: A1111 ends the first chunk after the comma (token 71), not at 75."""
    tokenizer, _ = text_model
    chunks = split_into_chunks(tokenizer, " ".join(["red"] * 70) + ", " + " ".join(["blue"] * 10))
    red, comma, blue = (tokenizer.convert_tokens_to_ids(t) for t in ("red</w>", ",</w>", "blue</w>"))
    assert chunks.ids[0][:73] == [START] + [red] * 70 + [comma, END]
    assert chunks.ids[1][:12] == [START] + [blue] * 10 + [END]
    far = split_into_chunks(tokenizer, " ".join(["red"] * 40) + ", " + " ".join(["blue"] * 50))
    assert far.ids[0][-2:] == [blue, END]  # the comma is 34 tokens back: cut at 75


def test_truncation_warns_with_the_words_it_cut(text_model):
    prompt = " ".join(["red"] * 75) + " blue square"
    with pytest.warns(UserWarning, match="dropped: 'blue square'"):
        embeddings = encode(text_model, prompt, truncate=True)
    assert embeddings.shape == (77, 16)


def test_a_shorter_context_chunks_at_its_own_length(text_model):
    _, encoder = text_model
    tokenizer = clip_tokenizer(model_max_length=24)  # 22 prompt tokens per chunk
    words = " ".join(["red circle"] * 15)  # 30 tokens: two chunks
    ids = tokenizer(words, add_special_tokens=False).input_ids
    embeddings = encode((tokenizer, encoder), words)
    with torch.no_grad():
        second = encoder(torch.tensor([[START, *ids[22:], END] + [END] * 14])).last_hidden_state
        plain = encode_prompts(tokenizer, encoder, ["a red circle"])
    assert embeddings.shape == (48, 16) and plain.shape == (1, 24, 16)
    torch.testing.assert_close(embeddings[24:], second[0])


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("it’s a “red” circle", 'it\'s a "red" circle'),  # typographic quotes, fixed by ftfy
        ("itâ€™s", "it's"),  # mojibake
        ("salt &amp; pepper &lt;3", "salt & pepper <3"),
        ("salt &amp;amp; pepper", "salt & pepper"),  # CLIP unescapes twice
        ("  A Red\n\tCircle  ", "a red circle"),
    ],
)
def test_text_is_cleaned_as_clips_tokenizer_cleans_it(raw, clean):
    assert clean_text(raw) == clean


def test_sampling_and_training_tokenize_a_curly_apostrophe_as_clip_does(text_model):
    """`it’s` -> `it`, `'s` as CLIP's tokenizer reads it, not byte pieces; the same for training's captions."""
    tokenizer, _ = text_model
    assert split_into_chunks(tokenizer, "it’s (red)").tokens == ["it", "'s", "red"]
    with torch.no_grad():
        torch.testing.assert_close(encode_prompts(*text_model, ["It’s red"]), encode_prompts(*text_model, ["it's red"]))
