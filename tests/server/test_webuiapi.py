"""The A1111 client library `webuiapi` (PyPI, 0.9.17) driving a server started here on a free port,
unchanged: txt2img, img2img, png-info, options, progress and interrupt; and a bounded load test."""

import resource
from concurrent.futures import ThreadPoolExecutor

import requests
import webuiapi
from PIL import Image

import sample


def test_webuiapi_works_unchanged(live, tiny_model_dir, tmp_path):
    port, _ = live
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
    result = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=5, steps=3, cfg_scale=6, width=16,
                         height=24, sampler_name="DPM++ 2M", scheduler="Karras")  # fmt: skip
    assert (
        sample.main(
            [
                "--model",
                str(tiny_model_dir),
                "--prompt",
                "a red circle",
                "--negative-prompt",
                "blue",
                "--seed",
                "5",
                "--steps",
                "3",
                "--guidance-scale",
                "6",
                "--width",
                "16",
                "--height",
                "24",
                "--scheduler",
                "dpm++2m-karras",
                "--device",
                "cpu",
                "--outdir",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    expected = Image.open(tmp_path / "cli" / "00000-5.png")
    assert list(result.image.convert("RGB").getdata()) == list(expected.convert("RGB").getdata())
    assert result.info["all_seeds"] == [5] and result.info["infotexts"][0] == expected.text["parameters"]

    edited = api.img2img(images=[result.image], prompt="a blue square", seed=2, steps=4, denoising_strength=0.5,
                         width=16, height=24, sampler_name="Euler")  # fmt: skip
    assert edited.image.size == (16, 24) and edited.info["denoising_strength"] == 0.5
    read = api.png_info(edited.image)
    assert read.info.startswith("a blue square\n") and read.parameters["Denoising strength"] == "0.5"

    assert api.get_options()["sd_model_checkpoint"] == tiny_model_dir.name
    api.set_options({"sd_model_checkpoint": tiny_model_dir.name})
    assert api.util_get_model_names() == [tiny_model_dir.name]
    assert "Euler a" in api.util_get_sampler_names()
    assert api.interrupt() == {} and api.get_progress()["progress"] == 0


def test_eight_clients_five_requests_each_are_all_answered(live):
    """Every request gets an image or a 503 (4 may wait), the server keeps answering, every image is
    on disk, and memory does not keep growing."""
    port, outdir = live
    url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"

    def client(k: int) -> list[int]:
        codes = []
        for i in range(5):
            payload = {"prompt": f"client {k} request {i}", "steps": 2, "seed": 10 * k + i, "width": 16, "height": 16}
            codes.append(requests.post(url, json=payload, timeout=120).status_code)
        return codes

    def peak_rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB

    with ThreadPoolExecutor(8) as pool:  # a first round: the model is loaded, caches are warm
        list(pool.map(client, range(8)))
    before = peak_rss()
    with ThreadPoolExecutor(8) as pool:
        codes = [code for codes in pool.map(client, range(8)) for code in codes]
    assert set(codes) <= {200, 503} and codes.count(200) >= 5
    written = len(list(outdir.glob("0*.png")))
    assert written >= codes.count(200) and written == len(outdir.joinpath("manifest.jsonl").read_text().splitlines())
    assert peak_rss() - before < 100 * 1024  # KiB: the second round holds no more than the first
    assert requests.get(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=10).status_code == 200
