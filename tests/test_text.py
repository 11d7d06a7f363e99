import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.text import clip_tokenizer, encode_prompts, save_tokenizer


def test_tokenizer_is_the_real_49408_token_clip_bpe():
    tokenizer = clip_tokenizer()
    assert tokenizer.vocab_size == 49408
    ids = tokenizer("a photograph of an astronaut riding a horse").input_ids
    assert ids == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_prompts_pad_to_77_tokens_with_the_preset_pad_token():
    sd1 = clip_tokenizer()(["a red circle"], padding="max_length", max_length=77).input_ids[0]
    sd2 = clip_tokenizer(pad_token="!")(["a red circle"], padding="max_length", max_length=77).input_ids[0]
    assert len(sd1) == len(sd2) == 77
    assert sd1[:5] == sd2[:5] == [49406, 320, 736, 7117, 49407]
    assert set(sd1[5:]) == {49407} and set(sd2[5:]) == {0}  # "!" is token 0


def test_saved_vocab_and_merges_rebuild_the_same_tokenizer(tmp_path):
    tokenizer = clip_tokenizer()
    save_tokenizer(tokenizer, tmp_path)
    (tmp_path / "tokenizer.json").unlink()  # leave only what transformers 4's slow tokenizer reads
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    prompt = "Two cats, 3 dogs & a café — at sunset!"
    assert reloaded(prompt).input_ids == tokenizer(prompt).input_ids
    assert (tmp_path / "merges.txt").read_text().splitlines()[:2] == ["#version: 0.2", "i n"]


def test_encode_prompts_gives_one_embedding_per_token():
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    encoder = CLIPTextModel(config).eval()
    tokenizer = clip_tokenizer()
    embeddings = encode_prompts(tokenizer, encoder, ["a red circle", "a large blue square at the top"])
    assert embeddings.shape == (2, 77, 16)
    ids = tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(embeddings[:1], encoder(ids).last_hidden_state)
