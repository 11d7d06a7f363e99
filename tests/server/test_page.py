"""The page at /, in a real browser: Playwright driving Debian's chromium (Playwright's own browser
download cannot work here). Type a prompt, generate, see the image and its settings in the gallery,
reuse a seed, send an image's settings back to the form, cancel a run. `.ci/run` installs chromium;
where it is missing the test says so and skips."""

import shutil

import pytest

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


def test_generate_see_the_gallery_reuse_a_seed_and_send_settings_back(page, live, tmp_path):
    page.wait_for_selector("#sampler option >> nth=1", state="attached")
    page.fill("#prompt", "a large red circle")
    page.fill("#steps", "2")
    page.fill("#width", "16")
    page.fill("#height", "24")
    page.fill("#seed", "7")
    page.select_option("#sampler", "Euler a|Uniform")
    page.click("#generate")
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
    page.wait_for_selector("#sampler option >> nth=1", state="attached")
    page.fill("#prompt", "a blue square")
    page.fill("#steps", "20")
    page.fill("#width", "16")
    page.fill("#height", "16")
    page.fill("#n_iter", "16")
    page.click("#generate")
    page.wait_for_function("parseFloat(document.getElementById('fill').style.width) > 0")
    page.click("#cancel")
    page.wait_for_function("!document.getElementById('generate').disabled")
    drawn = page.locator("#results figure").count()
    assert drawn < 16 and page.locator("#gallery figure").count() == drawn
    assert page.inner_text("#error") == ""


def test_an_error_is_shown_in_one_line(page):
    page.wait_for_selector("#sampler option >> nth=1", state="attached")
    page.fill("#prompt", "x")
    page.fill("#width", "12")
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent !== ''")
    assert page.inner_text("#error") == "width=12: must be a positive multiple of 8"
