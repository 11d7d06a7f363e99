"""The page at /, in a real browser: Playwright driving Debian's chromium (Playwright's own browser
download cannot work here). Type a prompt, generate, see the image and its settings in the gallery,
reuse a seed, send an image's settings back to the form, cancel a run. `.ci/run` installs chromium;
where it is missing the test says so and skips."""

import shutil

import pytest
from PIL import Image

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync"]  # fmt: skip


@pytest.fixture
def page(live):
    if CHROMIUM is None:
        pytest.skip("no chromium here: apt-get install chromium")
    port, _ = live
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"http://127.0.0.1:{port}/")
        yield page
        assert errors == []
        browser.close()


def generate(page, sampler: str = "", **fields: str) -> None:
    """Fill the form's fields (by id), pick the sampler, and press Generate."""
    page.wait_for_selector("#sampler option >> nth=1", state="attached")
    for name, value in fields.items():
        page.fill(f"#{name}", value)
    page.select_option("#sampler", sampler)
    page.click("#generate")


def test_generate_see_the_gallery_reuse_a_seed_and_send_settings_back(page, live, tmp_path):
    generate(page, "Euler a|Uniform", prompt="a large red circle", steps="2", width="16", height="24", seed="7")
    page.wait_for_selector("#results figure img")
    assert page.inner_text("#status") == "1 image(s), seed 7"
    caption = page.inner_text("#gallery figure figcaption >> nth=0")
    assert caption.startswith("a large red circle\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 7, Size: 16x24")
    assert page.locator("#gallery figure").count() == 1
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    page.fill("#seed", "-1")
    page.click("#reuse")
    assert page.input_value("#seed") == "7"
    page.fill("#prompt", "")
    page.fill("#steps", "")
    page.click("#gallery figure button")
    page.wait_for_function("document.getElementById('prompt').value === 'a large red circle'")
    assert page.input_value("#steps") == "2" and page.input_value("#sampler") == "Euler a|Uniform"


def test_cancel_stops_a_run_and_keeps_its_finished_images(page):
    generate(page, prompt="a blue square", steps="20", width="16", height="16", n_iter="16")
    page.wait_for_function("parseFloat(document.getElementById('fill').style.width) > 0")
    page.click("#cancel")
    page.wait_for_function("!document.getElementById('generate').disabled")
    drawn = page.locator("#results figure").count()
    assert drawn < 16 and page.locator("#gallery figure").count() == drawn
    assert page.inner_text("#error") == ""


def test_an_error_is_shown_in_one_line(page):
    generate(page, prompt="x", width="12")
    page.wait_for_function("document.getElementById('error').textContent !== ''")
    assert page.inner_text("#error") == "width=12: must be a positive multiple of 8"


def test_a_dropped_png_fills_the_form_with_its_settings(page, live):
    generate(page, prompt="a small blue square", steps="3", seed="12", width="16", height="16")
    page.wait_for_selector("#gallery figure img")
    page.fill("#prompt", "")
    page.fill("#seed", "-1")
    page.evaluate("""async () => {
        const blob = await (await fetch(document.querySelector('#gallery figure img').src)).blob();
        const files = new DataTransfer();
        files.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
        document.dispatchEvent(new DragEvent('drop', {dataTransfer: files, bubbles: true, cancelable: true}));
    }""")
    page.wait_for_function("document.getElementById('prompt').value === 'a small blue square'")
    assert (page.input_value("#seed"), page.input_value("#steps")) == ("12", "3")


def test_the_hires_fix_and_image_to_image_from_the_page(page, tmp_path):
    generate(page, prompt="a circle", steps="2", width="16", height="16", seed="3", hr_scale="2", hr_denoise="0.5")
    page.wait_for_selector("#results figure img")
    assert page.evaluate("document.querySelector('#results figure img').naturalWidth") == 32
    assert "Denoising strength: 0.5, Hires upscale: 2.0, Hires upscaler: Latent" in page.inner_text("#results")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "start.png")
    page.fill("#hr_scale", "")
    page.set_input_files("#init_image", str(tmp_path / "start.png"))
    page.fill("#strength", "0.4")
    page.click("#generate")
    page.wait_for_function("document.getElementById('results').innerText.includes('Denoising strength: 0.4')")
    assert "Denoising strength: 0.4" in page.inner_text("#results") and "Hires" not in page.inner_text("#results")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
