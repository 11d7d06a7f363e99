"""The A1111 API (/sdapi/v1/*) on the tiny model, through FastAPI's test client: the same pictures and
PNG text as sample.py, A1111's response shapes (modules/api/api.py, commit 0050a354), the fields we
refuse, the limits and the folders' safety."""

import base64
import io
import json
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

import sample
from commands import serve

PNG_TEXT = ("prompt", "negative_prompt", "seed", "steps", "scheduler", "guidance_scale", "width", "height")


@pytest.fixture
def served(tiny_model_dir, tmp_path):
    """A server on the tiny model, a LoRA folder with one text-encoder LoRA, and its outputs folder."""
    loras = tmp_path / "loras"
    loras.mkdir()
    layer = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    torch.manual_seed(0)
    save_file({f"{layer}.lora_down.weight": torch.randn(1, 8), f"{layer}.lora_up.weight": torch.randn(8, 1)},
              loras / "style.safetensors")  # fmt: skip
    argv = ["--model", str(tiny_model_dir), "--lora-dir", str(loras), "--outdir", str(tmp_path / "out"),
            "--device", "cpu", "--max-steps", "20"]  # fmt: skip
    app = serve.build(serve.parse(argv))
    return TestClient(app), tmp_path


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def sample_py(tmp_path, *argv) -> Image.Image:
    outdir = tmp_path / "cli"
    assert sample.main([*map(str, argv), "--device", "cpu", "--outdir", str(outdir)]) == 0
    return Image.open(sorted(outdir.glob("0*.png"))[0])


def test_txt2img_draws_what_sample_py_draws_with_the_same_text(served, tiny_model_dir):
    client, tmp_path = served
    payload = {"prompt": "a (red) circle", "negative_prompt": "blue", "steps": 3, "cfg_scale": 5, "seed": 11,
               "width": 32, "height": 16, "sampler_name": "Euler a", "scheduler": "Automatic"}  # fmt: skip
    response = client.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    image = decode(body["images"][0])
    expected = sample_py(tmp_path, "--model", tiny_model_dir, "--prompt", "a (red) circle", "--negative-prompt",
                         "blue", "--steps", 3, "--guidance-scale", 5, "--seed", 11, "--width", 32, "--height", 16,
                         "--scheduler", "euler-ancestral")  # fmt: skip
    assert list(image.getdata()) == list(expected.convert(image.mode).getdata())
    assert {k: image.text[k] for k in PNG_TEXT} == {k: expected.text[k] for k in PNG_TEXT}
    assert image.text["parameters"] == expected.text["parameters"]
    info = json.loads(body["info"])
    assert (info["seed"], info["all_seeds"], info["sampler_name"], info["cfg_scale"]) == (11, [11], "Euler a", 5.0)
    assert info["infotexts"] == [expected.text["parameters"]] and body["parameters"]["prompt"] == "a (red) circle"
    assert len(list((tmp_path / "out").glob("0*.png"))) == 1  # written, as sample.py writes


def test_batches_and_a_random_seed_are_reported(served):
    client, _ = served
    body = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "seed": -1, "batch_size": 2,
                                                  "n_iter": 2, "width": 16, "height": 16}).json()  # fmt: skip
    info = json.loads(body["info"])
    assert len(body["images"]) == 4 and info["all_seeds"] == [info["seed"] + k for k in range(4)]
    assert [decode(i).text["seed"] for i in body["images"]] == [str(s) for s in info["all_seeds"]]


def test_a_lora_tag_draws_what_sample_py_draws_with_lora(served, tiny_model_dir):
    client, tmp_path = served
    payload = {"prompt": "a circle <lora:style:0.7>", "steps": 2, "seed": 3, "width": 16, "height": 16,
               "sampler_name": "DDIM"}  # fmt: skip
    image = decode(client.post("/sdapi/v1/txt2img", json=payload).json()["images"][0])
    plain = decode(client.post("/sdapi/v1/txt2img", json=payload | {"prompt": "a circle"}).json()["images"][0])
    expected = sample_py(tmp_path, "--model", tiny_model_dir, "--prompt", "a circle", "--steps", 2, "--seed", 3,
                         "--width", 16, "--height", 16, "--scheduler", "ddim", "--lora",
                         f"{tmp_path / 'loras' / 'style.safetensors'}:0.7")  # fmt: skip
    assert list(image.getdata()) == list(expected.convert(image.mode).getdata())
    assert list(image.getdata()) != list(plain.getdata())
    assert 'Lora: "style:0.7"' in image.text["parameters"]


def test_hires_fix_draws_what_sample_py_draws_with_hires_scale(served, tiny_model_dir):
    """A1111's enable_hr, hr_scale, hr_upscaler, hr_second_pass_steps and denoising_strength."""
    client, tmp_path = served
    payload = {"prompt": "a circle", "steps": 3, "seed": 5, "width": 16, "height": 16, "enable_hr": True,
               "hr_scale": 2, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 2,
               "denoising_strength": 0.6}  # fmt: skip
    body = client.post("/sdapi/v1/txt2img", json=payload).json()
    image = decode(body["images"][0])
    expected = sample_py(tmp_path, "--model", tiny_model_dir, "--prompt", "a circle", "--steps", 3, "--seed", 5,
                         "--width", 16, "--height", 16, "--hires-scale", 2, "--hires-upscaler", "lanczos",
                         "--hires-steps", 2, "--hires-denoise", 0.6)  # fmt: skip
    assert image.size == (32, 32) and list(image.getdata()) == list(expected.convert(image.mode).getdata())
    assert image.text["parameters"] == expected.text["parameters"]
    assert (
        "Denoising strength: 0.6, Hires upscale: 2.0, Hires steps: 2, Hires upscaler: Lanczos"
        in (image.text["parameters"])
    )


def test_img2img_with_a_mask_keeps_the_unmasked_pixels(served):
    client, _ = served
    start = Image.new("RGB", (16, 16), (200, 30, 30))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))

    def b64(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    payload = {"prompt": "x", "steps": 2, "seed": 1, "init_images": [b64(start)], "mask": b64(mask),
               "denoising_strength": 0.6, "mask_blur": 0, "inpainting_fill": 1}  # fmt: skip
    response = client.post("/sdapi/v1/img2img", json=payload)
    assert response.status_code == 200, response.text
    image = decode(response.json()["images"][0]).convert("RGB")
    assert image.size == (16, 16) and image.getpixel((12, 5)) == (200, 30, 30)
    assert json.loads(response.json()["info"])["denoising_strength"] == 0.6
    blurred = client.post("/sdapi/v1/img2img", json=payload | {"mask_blur": 4})
    assert blurred.status_code == 422 and "mask_blur=4" in blurred.json()["detail"]


@pytest.mark.parametrize(
    "field, value",
    [("hr_upscaler", "R-ESRGAN 4x+"), ("hr_resize_x", 1024),
     ("restore_faces", True), ("styles", ["cinematic"]), ("subseed_strength", 0.5),
     ("alwayson_scripts", {"ControlNet": {"args": [{"enabled": True}]}}), ("script_name", "x/y/z plot"),
     ("override_settings", {"CLIP_stop_at_last_layers": 2}), ("eta", 0.5), ("prompt", "<hypernet:x:1>"),
     ("sampler_name", "DPM2 a"), ("scheduler", "exponential"), ("alwayson_scripts", {"x": 5}),
     ("alwayson_scripts", {"x": {"args": 5}})],
)  # fmt: skip
def test_a_field_that_would_change_the_picture_is_a_422_naming_it(served, field, value):
    client, _ = served
    payload = {"prompt": "x", "steps": 1, field: value} | ({"enable_hr": True} if field.startswith("hr_") else {})
    response = client.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 422
    named = field if field not in ("override_settings", "prompt", "alwayson_scripts") else ""
    assert named in response.json()["detail"] and "\n" not in response.json()["detail"]


def test_webuiapi_defaults_at_neutral_values_are_accepted(served):
    """The payload webuiapi 0.9.17 sends for txt2img by default (webuiapi.py, WebUIApi.txt2img)."""
    client, _ = served
    payload = {"enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0,
               "denoising_strength": 0.7, "prompt": "x", "styles": [], "seed": 1, "subseed": -1,
               "subseed_strength": 0.0, "seed_resize_from_h": 0, "seed_resize_from_w": 0, "batch_size": 1,
               "n_iter": 1, "steps": 1, "cfg_scale": 7.0, "width": 16, "height": 16, "restore_faces": False,
               "tiling": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
               "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
               "sampler_name": "Euler a", "scheduler": "automatic", "sampler_index": "Euler a", "script_name": None,
               "script_args": [], "send_images": True, "save_images": False,
               "alwayson_scripts": {"ControlNet": {"args": []}}}  # fmt: skip
    assert client.post("/sdapi/v1/txt2img", json=payload).status_code == 200


@pytest.mark.parametrize(
    "payload, status, message",
    [
        ({"prompt": "x", "steps": 21}, 422, "steps=21: this server allows at most 20"),
        ({"prompt": "x", "steps": 0}, 422, "steps=0: must be at least 1"),
        ({"prompt": "x", "cfg_scale": "lots"}, 422, "cfg_scale"),
        ({"prompt": "x", "override_settings": {"sd_model_checkpoint": "../tiny"}}, 422, "not offered here"),
        ({"prompt": "x <lora:../loras/style:1>"}, 422, "not offered here"),
        ({"prompt": "x", "width": 12}, 422, "width=12: must be a positive multiple of 8"),
    ],
)
def test_bad_requests_are_422s_with_a_message(served, payload, status, message):
    client, _ = served
    response = client.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == status and message in response.text


def png_base64(size: tuple[int, int] = (16, 16)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"enable_hr": True, "hr_scale": 4, "width": 2048, "height": 2048},
         "hr_scale=4: the hires pass would draw 8192x8192; this server allows at most 2048 a side"),
        ({"enable_hr": True, "hr_scale": 2, "width": 1536, "height": 512},
         "hr_scale=2: the hires pass would draw 3072x1024; this server allows at most 2048 a side"),
        ({"enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 100000},
         "hr_second_pass_steps=100000: this server allows at most 20"),
        ({"alwayson_scripts": {"controlnet": {"args": 4 * [{"model": "edges", "image": "IMAGE"}]}}},
         "alwayson_scripts.controlnet.args (units)=4: this server allows at most 3"),
    ],
)  # fmt: skip
def test_the_hires_pass_and_controlnet_units_are_bounded_before_any_image_is_decoded(
    served, monkeypatch, payload, message
):
    """Issue 42: the hires pass's output size and steps, and the number of units, were unbounded."""
    client, tmp_path = served
    monkeypatch.setattr("server.a1111.read_image", lambda *_: pytest.fail("an image was decoded"))
    payload = json.loads(json.dumps(payload).replace('"IMAGE"', json.dumps(png_base64())))
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1} | payload)
    assert (response.status_code, response.json()["detail"]) == (422, message)
    assert not list((tmp_path / "out").glob("*.png"))


def test_the_hires_pass_of_the_models_default_size_is_bounded_before_drawing(tiny_model_dir, tmp_path):
    """No width or height in the request: the model's own size (16x16 for the tiny model), known once
    it is loaded, is checked before the first step."""
    argv = ["--model", str(tiny_model_dir), "--outdir", str(tmp_path / "out"), "--device", "cpu", "--max-side", "32"]
    client = TestClient(serve.build(serve.parse(argv)))
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "enable_hr": True, "hr_scale": 4})
    assert (response.status_code, response.json()["detail"]) == (
        422, "hr_scale=4: the hires pass would draw 64x64; this server allows at most 32 a side"
    )  # fmt: skip
    assert not list((tmp_path / "out").glob("*"))
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "enable_hr": True, "hr_scale": 2})
    assert response.status_code == 200 and decode(response.json()["images"][0]).size == (32, 32)


def test_malformed_json_oversized_bodies_and_bombs_are_refused(served, tiny_model_dir, tmp_path):
    client, _ = served
    assert client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"}
                       ).status_code == 422  # fmt: skip
    small = serve.build(serve.parse(["--model", str(tiny_model_dir), "--outdir", str(tmp_path / "o"),
                                     "--max-body-mb", "1"]))  # fmt: skip
    assert TestClient(small).post("/sdapi/v1/txt2img", json={"prompt": "x" * (2 << 20)}).status_code == 413
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")  # 400 million pixels in a few kB
    bomb = base64.b64encode(buffer.getvalue()).decode()
    response = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [bomb]})
    assert response.json()["detail"] == (
        "init_images[0]: image too large (400,000,000 pixels, more than the 16,777,216 decoded here)"
    )
    response = client.post("/sdapi/v1/png-info", json={"image": bomb})
    assert response.status_code == 422 and response.json()["detail"].startswith("image: image too large (400,000,000")
    response = client.post("/sdapi/v1/png-info", json={"image": "bm90IGFuIGltYWdl"})
    assert response.status_code == 422 and "image: unreadable image" in response.json()["detail"]


def test_listings_options_and_png_info(served, tiny_model_dir):
    client, tmp_path = served
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == [tiny_model_dir.name]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == tiny_model_dir.name
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": tiny_model_dir.name}).status_code == 200
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 422
    assert [lora["name"] for lora in client.get("/sdapi/v1/loras").json()] == ["style"]
    assert "Euler a" in [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert "karras" in [s["name"] for s in client.get("/sdapi/v1/schedulers").json()]
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    image = client.post("/sdapi/v1/txt2img", json={"prompt": "a, b", "steps": 1, "seed": 4, "width": 16,
                                                   "height": 24}).json()["images"][0]  # fmt: skip
    read = client.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert read["info"].startswith("a, b\nSteps: 1") and read["items"]["seed"] == "4"
    parameters = read["parameters"]
    assert (parameters["Seed"], parameters["Size-1"], parameters["Size-2"]) == ("4", "16", "24")


def test_models_and_loras_resolve_only_inside_their_folders(tiny_model_dir, tmp_path):
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir(), loras.mkdir()
    (models / "outside").symlink_to(tiny_model_dir)  # a link out of the folder: not offered
    (loras / "escape.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    app = serve.build(serve.parse(["--model", str(tiny_model_dir), "--models-dir", str(models), "--lora-dir",
                                   str(loras), "--outdir", str(tmp_path / "o")]))  # fmt: skip
    client = TestClient(app)
    assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == [tiny_model_dir.name]
    assert client.get("/sdapi/v1/loras").json() == []
    for name in ("outside", str(tiny_model_dir), "../models/outside"):
        response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert response.status_code == 422 and "not offered here" in response.json()["detail"]
    assert client.get("/outputs/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_interrupt_stops_a_run_and_keeps_what_is_done(served):
    client, _ = served
    result = {}

    def long_run():
        result["response"] = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 20, "n_iter": 16,
                                                                    "width": 16, "height": 16})  # fmt: skip

    thread = threading.Thread(target=long_run)
    thread.start()
    deadline = time.time() + 60
    while client.get("/sdapi/v1/progress").json()["state"]["job_no"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    progress = client.get("/sdapi/v1/progress").json()
    assert 0 < progress["progress"] < 1 and progress["current_image"] is not None
    assert client.post("/sdapi/v1/interrupt").json() == {}
    thread.join(60)
    response = result["response"]
    assert response.status_code == 200 and 1 <= len(response.json()["images"]) < 16
    assert client.get("/sdapi/v1/progress").json()["progress"] == 0


def test_a_password_guards_every_route(tiny_model_dir, tmp_path):
    argv = ["--model", str(tiny_model_dir), "--outdir", str(tmp_path / "o"), "--listen", "--api-auth", "me:pw"]
    client = TestClient(serve.build(serve.parse(argv)))
    assert client.get("/sdapi/v1/options").status_code == 401
    assert client.get("/sdapi/v1/options", auth=("me", "wrong")).status_code == 401
    assert client.get("/sdapi/v1/options", auth=("me", "pw")).status_code == 200
    assert client.get("/", auth=("me", "nope")).status_code == 401


def test_listen_without_a_password_is_refused(tiny_model_dir, capsys):
    assert serve.main(["--model", str(tiny_model_dir), "--listen"]) == 2
    assert "--listen serves every address: give --api-auth" in capsys.readouterr().err


def test_a_model_that_fails_to_load_is_a_422_and_the_server_goes_on(tiny_model_dir, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "broken.safetensors").write_bytes(b"not a checkpoint")
    app = serve.build(serve.parse(["--model", str(tiny_model_dir), "--models-dir", str(models), "--outdir",
                                   str(tmp_path / "o"), "--device", "cpu"]))  # fmt: skip
    client = TestClient(app)
    payload = {"prompt": "x", "steps": 1, "width": 16, "height": 16}
    broken = client.post("/sdapi/v1/txt2img", json=payload | {"override_settings": {"sd_model_checkpoint": "broken"}})
    assert broken.status_code == 422 and "broken.safetensors" in broken.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json=payload).status_code == 200


def test_embeddings_are_listed_used_and_recorded_as_sample_py_records_them(tiny_model_dir, tmp_path):
    """A1111's /embeddings shape (loaded: those of the model's width; skipped: the others), and a
    prompt naming one draws what sample.py --embeddings draws, TI hashes included."""
    from ldm.embeddings import save_embedding

    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.manual_seed(0)
    save_embedding(folder / "rose.safetensors", [torch.randn(2, 8) * 5])
    save_embedding(folder / "wide.safetensors", [torch.randn(1, 768)])
    argv = ["--model", str(tiny_model_dir), "--embeddings-dir", str(folder), "--outdir", str(tmp_path / "out"),
            "--device", "cpu"]  # fmt: skip
    client = TestClient(serve.build(serve.parse(argv)))
    assert client.get("/sdapi/v1/embeddings").json() == {
        "loaded": {"rose": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 8, "vectors": 2}},
        "skipped": {"wide": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768,
                             "vectors": 1}},
    }  # fmt: skip
    payload = {"prompt": "a rose circle", "steps": 2, "seed": 3, "width": 16, "height": 16, "sampler_name": "DDIM"}
    image = decode(client.post("/sdapi/v1/txt2img", json=payload).json()["images"][0])
    expected = sample_py(tmp_path, "--model", tiny_model_dir, "--prompt", "a rose circle", "--steps", 2, "--seed", 3,
                         "--width", 16, "--height", 16, "--scheduler", "ddim", "--embeddings", folder)  # fmt: skip
    assert list(image.getdata()) == list(expected.convert(image.mode).getdata())
    assert 'TI hashes: "rose: ' in image.text["parameters"]
    assert image.text["parameters"] == expected.text["parameters"]


def test_controlnet_units_draw_what_sample_py_draws(tiny_model_dir, tmp_path):
    """sd-webui-controlnet's API: /controlnet/model_list, and `alwayson_scripts.controlnet.args` units
    drawing what sample.py --controlnet draws, with the same infotext."""
    from conftest import perturb
    from ldm.controlnet import ControlNet
    from ldm.model import LatentDiffusion

    folder = tmp_path / "controlnets"
    perturb(ControlNet.from_unet(LatentDiffusion.load(tiny_model_dir).unet, 2), seed=4).save(folder / "edges")
    square = Image.new("RGB", (16, 16))
    square.paste((255, 255, 255), (4, 4, 12, 12))
    square.save(tmp_path / "control.png")
    argv = ["--model", str(tiny_model_dir), "--controlnet-dir", str(folder), "--outdir", str(tmp_path / "out"),
            "--device", "cpu"]  # fmt: skip
    client = TestClient(serve.build(serve.parse(argv)))
    (name,) = client.get("/controlnet/model_list").json()["model_list"]
    assert name.startswith("edges [") and client.get("/controlnet/module_list").json()["module_list"] == [
        "none",
        "canny",
    ]
    encoded = base64.b64encode((tmp_path / "control.png").read_bytes()).decode()
    unit = {
        "enabled": True,
        "module": "canny",
        "model": name,
        "weight": 0.7,
        "image": encoded,
        "guidance_start": 0.0,
        "guidance_end": 0.5,
        "resize_mode": "Crop and Resize",
        "control_mode": "Balanced",
        "threshold_a": 100,
    }
    payload = {"prompt": "a circle", "steps": 3, "seed": 5, "width": 16, "height": 16, "sampler_name": "DDIM",
               "alwayson_scripts": {"controlnet": {"args": [unit, {"enabled": False}]}}}  # fmt: skip
    response = client.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 200, response.text
    image = decode(response.json()["images"][0])
    expected = sample_py(tmp_path, "--model", tiny_model_dir, "--prompt", "a circle", "--steps", 3, "--seed", 5,
                         "--width", 16, "--height", 16, "--scheduler", "ddim", "--controlnet", folder / "edges",
                         "--control-image", tmp_path / "control.png", "--control-scale", 0.7, "--control-end", 0.5,
                         "--control-preprocess", "canny")  # fmt: skip
    assert list(image.getdata()) == list(expected.convert(image.mode).getdata())
    assert image.text["parameters"] == expected.text["parameters"] and "ControlNet 0: " in image.text["parameters"]
    for change, message in [({"module": "depth"}, "module='depth': use one of none, canny"),
                            ({"threshold_b": 50}, "threshold_b=50: canny runs at 200 here"),
                            ({"model": "nope"}, "ControlNet 'nope' is not offered here")]:  # fmt: skip
        bad = payload | {"alwayson_scripts": {"controlnet": {"args": [unit | change]}}}
        response = client.post("/sdapi/v1/txt2img", json=bad)
        assert response.status_code == 422 and message in response.json()["detail"], response.text
