"""The A1111 `parameters` text, written and read as modules/infotext_utils.py does (commit 03650022):
`quote` and the pair pattern of `parse_generation_parameters`."""

from pipelines.infotext import format_infotext, parse_infotext, quote


def test_values_with_commas_colons_or_newlines_are_json_quoted():
    assert quote("Euler a") == "Euler a"
    assert quote(7.5) == "7.5"
    assert quote("my,model") == '"my,model"'
    assert quote("style:0.8, detail:1.0") == '"style:0.8, detail:1.0"'
    assert quote('say "hi", then\nleave') == '"say \\"hi\\", then\\nleave"'


def test_what_we_write_reads_back_field_for_field():
    pairs = {"Steps": 25, "Sampler": "DPM++ 2M", "CFG scale": 2.5, "Seed": 7, "Size": "64x64",
             "Model hash": "0123456789", "Model": "my,model", "Denoising strength": None,
             "Lora": "style:0.8, detail:1.0"}  # fmt: skip
    text = format_infotext("a (red:1.2) circle,\non grey", "blue, square", pairs)
    assert parse_infotext(text) == {
        "Prompt": "a (red:1.2) circle,\non grey", "Negative prompt": "blue, square", "Steps": "25",
        "Sampler": "DPM++ 2M", "CFG scale": "2.5", "Seed": "7", "Size": "64x64", "Model hash": "0123456789",
        "Model": "my,model", "Lora": "style:0.8, detail:1.0",
    }  # fmt: skip


def test_an_empty_negative_prompt_has_no_line_as_in_a1111():
    """modules/processing.py, create_infotext: `Negative prompt:` only when there is one."""
    text = format_infotext("a red circle", "", {"Steps": 25, "Seed": 7, "Size": "64x64"})
    assert text == "a red circle\nSteps: 25, Seed: 7, Size: 64x64"
    assert parse_infotext(text)["Negative prompt"] == ""


def test_a1111s_own_example_parses():
    text = (
        "girl with an artist's beret, ((eyeshadow)), (coquettish)\n"
        "Negative prompt: ugly, (((deformed))), [blurry]\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
    )
    fields = parse_infotext(text)
    assert fields["Prompt"] == "girl with an artist's beret, ((eyeshadow)), (coquettish)"
    assert fields["Negative prompt"] == "ugly, (((deformed))), [blurry]"
    assert (fields["Sampler"], fields["Seed"], fields["Model hash"]) == ("Euler a", "965400086", "45dee52b")


def test_a_last_line_of_fewer_than_three_pairs_is_prompt_text():
    assert parse_infotext("a cat\nstyle: oil, mood: calm") == {"Prompt": "a cat\nstyle: oil, mood: calm",
                                                               "Negative prompt": ""}  # fmt: skip
