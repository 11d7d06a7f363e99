"""The server's routes: A1111's /sdapi/v1/* over the worker, the page at /, and the checks every
request passes (HTTP basic auth when asked for, a body size limit). A user's mistake is a 422 with
one line, a full queue a 503, and a request that fails for another reason a 500 that leaves the
server running."""

import io
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image

from ldm.embeddings import EmbeddingError
from ldm.errors import UserError
from pipelines.choices import CONTROL_PREPROCESSORS
from pipelines.embeddings import EmbeddingFolder
from pipelines.infotext import parse_infotext
from pipelines.outputs import read_manifest
from server import a1111
from server.folders import Entry, find, list_controlnets, list_loras, list_models
from server.limits import Limits
from server.worker import Busy, Order, Worker

PAGE = Path(__file__).resolve().parent / "page"


@dataclass
class Server:
    """What the routes share: the worker, the folders, the current model and the limits."""

    worker: Worker
    default_model: Path
    models_dir: Path | None
    lora_dir: Path | None
    limits: Limits
    controlnet_dir: Path | None = None
    checkpoint: Entry | None = None  # /options' sd_model_checkpoint; the default model until set

    def models(self) -> list[Entry]:
        return list_models(self.default_model, self.models_dir)

    def loras(self) -> list[Entry]:
        return list_loras(self.lora_dir)

    def controlnets(self) -> list[Entry]:
        return list_controlnets(self.controlnet_dir)

    def current(self) -> Entry:
        return self.checkpoint or self.models()[0]

    def order(self, translated: a1111.Translated) -> Order:
        checkpoint = self.current() if translated.checkpoint is None else self.model(translated.checkpoint)
        loras = tuple((find(self.loras(), name, "LoRA"), scale) for name, scale in translated.loras)
        controls = tuple(
            (find(self.controlnets(), unit.model.rsplit(" [", 1)[0], "ControlNet"), unit)
            for unit in translated.controls
        )  # sd-webui-controlnet's names end in " [hash]"
        return Order(translated.prompt, translated.config, checkpoint, loras, translated.init_image, translated.mask,
                     controls)  # fmt: skip

    def embeddings(self) -> dict[str, Any]:
        """A1111's /embeddings: those that fit the current model ("loaded") and those that do not
        ("skipped"), each with its width and vector count (modules/api/api.py, get_embeddings)."""
        found: dict[str, dict] = {"loaded": {}, "skipped": {}}
        if self.worker.embeddings is None:
            return found
        folder = EmbeddingFolder(self.worker.embeddings)
        widths = self.worker.text_widths(self.current())
        for name in folder.files:
            try:
                embedding = folder.embedding(name)
            except EmbeddingError:
                continue  # unreadable, or a name two files share: A1111 lists neither
            fits = all(embedding.for_encoder(k, len(widths), w) is not None for k, w in enumerate(widths))
            shape = sum(vectors.shape[-1] for vectors in embedding.vectors.values())
            found["loaded" if fits else "skipped"][name] = {
                "step": embedding.step, "sd_checkpoint": None, "sd_checkpoint_name": None,
                "shape": shape, "vectors": embedding.count,
            }  # fmt: skip
        return found

    def model(self, name: str) -> Entry:
        return find(self.models(), name.rsplit(" [", 1)[0], "model")  # A1111 titles may end in " [hash]"


def make_app(server: Server, auth: tuple[str, str] | None = None) -> FastAPI:
    """The FastAPI app: every route behind HTTP basic auth when `auth` is (user, password)."""
    dependencies = [] if auth is None else [Depends(_basic_auth(auth))]
    app = FastAPI(title="ldm-toolkit", dependencies=dependencies, docs_url=None, redoc_url=None)
    app.middleware("http")(_body_limit(server.limits.body))

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError) -> JSONResponse:
        return JSONResponse({"error": type(error).__name__, "detail": str(error)}, status_code=422)

    @app.exception_handler(Busy)
    async def busy(request: Request, error: Busy) -> JSONResponse:
        return JSONResponse({"error": "Busy", "detail": str(error)}, status_code=503)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": type(error).__name__, "detail": str(error)}, status_code=500)

    @app.post("/sdapi/v1/txt2img")
    def txt2img(request: a1111.Txt2ImgRequest) -> dict[str, Any]:
        return _generate(server, request)

    @app.post("/sdapi/v1/img2img")
    def img2img(request: a1111.Img2ImgRequest) -> dict[str, Any]:
        if not request.init_images:
            raise a1111.Unsupported("init_images: give the image to start from")
        return _generate(server, request)

    @app.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        return {"sd_model_checkpoint": server.current().title, "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    def set_options(options: dict[str, Any]) -> None:
        for name in options:
            if name not in ("sd_model_checkpoint", "samples_format"):
                raise a1111.Unsupported(f"{name}: not an option here (sd_model_checkpoint)")
        if options.get("samples_format", "png") != "png":
            raise a1111.Unsupported("samples_format: only png here")
        if "sd_model_checkpoint" in options:
            server.checkpoint = server.model(str(options["sd_model_checkpoint"]))

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [{"title": m.title, "model_name": m.name, "hash": None, "sha256": None, "filename": str(m.path),
                 "config": None} for m in server.models()]  # fmt: skip

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        """The folder is listed afresh on every request; nothing to do."""

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return a1111.schedulers()

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict[str, Any]]:
        return [{"name": e.name, "alias": e.name, "path": str(e.path), "metadata": {}} for e in server.loras()]

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras() -> None:
        """Listed afresh on every request."""

    @app.get("/controlnet/model_list")
    def controlnet_models() -> dict[str, list[str]]:
        """sd-webui-controlnet's listing: each model as "name [hash]"."""
        return {"model_list": [f"{e.name} [{server.worker.short_hash(e.path)}]" for e in server.controlnets()]}

    @app.get("/controlnet/module_list")
    def controlnet_modules() -> dict[str, list[str]]:
        return {"module_list": list(CONTROL_PREPROCESSORS)}

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict[str, Any]:
        return server.embeddings()

    @app.get("/sdapi/v1/scripts")
    def scripts() -> dict[str, list]:
        return {"txt2img": [], "img2img": []}

    @app.post("/sdapi/v1/png-info")
    def png_info(request: dict[str, Any]) -> dict[str, Any]:
        image = a1111.decode_image(str(request.get("image", "")).strip(), "image", server.limits.upload_pixels)
        chunks = {k: v for k, v in getattr(image, "text", {}).items() if isinstance(v, str)}
        text = chunks.pop("parameters", "")
        parameters = parse_infotext(text) if text else {}
        width, _, height = parameters.get("Size", "").partition("x")
        parameters |= {"Size-1": width, "Size-2": height} if height else {}
        return {"info": text, "items": chunks, "parameters": parameters}

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return _progress(server.worker, skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> dict:
        server.worker.interrupt()
        return {}

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(PAGE / "index.html")

    @app.get("/page/{name}")
    def page_file(name: str) -> FileResponse:
        if name not in ("page.js", "page.css"):
            raise HTTPException(404, f"{name}: no such file")
        return FileResponse(PAGE / name)

    @app.get("/gallery")
    def gallery() -> list[dict[str, Any]]:
        """The outputs folder's images, newest first, each with its settings."""
        entries = read_manifest(server.worker.outdir)
        files = [e for e in entries if (server.worker.outdir / str(e.get("file", ""))).is_file()]
        return [{"file": e["file"], "parameters": e.get("parameters", ""), "seed": e.get("seed")}
                for e in reversed(files)]  # fmt: skip

    @app.get("/outputs/{name}")
    def output(name: str) -> FileResponse:
        listed = {str(e.get("file")) for e in read_manifest(server.worker.outdir)}
        if name not in listed:  # only the files the manifest names: no path out of the folder
            raise HTTPException(404, f"{name}: no such image")
        return FileResponse(server.worker.outdir / name, media_type="image/png")

    return app


def _generate(server: Server, request) -> dict[str, Any]:
    translated = a1111.translate(request, server.limits)
    order = server.order(translated)
    drawn = server.worker.draw(order)
    images = [a1111.encode_png(path.read_bytes()) for _, path in drawn.images] if request.send_images else []
    seeds = [generated.seed for generated, _ in drawn.images]
    infotexts = [generated_text(path) for _, path in drawn.images]
    info = a1111.info(order.prompt, drawn.config, seeds, infotexts, order.checkpoint.name, drawn.settings.model_hash)
    return {"images": images, "parameters": request.model_dump(), "info": info}


def generated_text(path: Path) -> str:
    with Image.open(path) as image:
        return image.text.get("parameters", "")


def _progress(worker: Worker, skip_current_image: bool) -> dict[str, Any]:
    """A1111's progress: the fraction of the request's images and of the current one's steps done."""
    state = worker.progress
    snapshot = {"skipped": False, "interrupted": state.interrupted, "job": "", "job_count": state.job_count,
                "job_timestamp": state.job_timestamp, "job_no": state.job_no, "sampling_step": state.step,
                "sampling_steps": state.steps}  # fmt: skip
    if state.job_count == 0 or state.job_no >= state.job_count:
        return {"progress": 0, "eta_relative": 0, "state": snapshot, "current_image": None, "textinfo": None}
    done = (state.job_no + (state.step / state.steps if state.steps else 0)) / state.job_count
    elapsed = time.time() - state.started
    eta = elapsed / done - elapsed if done > 0 else 0
    image = None if skip_current_image else worker.preview()
    return {"progress": min(done, 1), "eta_relative": eta, "state": snapshot,
            "current_image": None if image is None else a1111.encode_png(_png(image)), "textinfo": None}  # fmt: skip


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _basic_auth(auth: tuple[str, str]):
    security = HTTPBasic()

    def check(credentials: Annotated[HTTPBasicCredentials, Depends(security)]) -> None:
        user_ok = secrets.compare_digest(credentials.username.encode(), auth[0].encode())
        password_ok = secrets.compare_digest(credentials.password.encode(), auth[1].encode())
        if not (user_ok and password_ok):
            raise HTTPException(401, "incorrect user or password", headers={"WWW-Authenticate": "Basic"})

    return check


def _body_limit(limit: int):
    async def check(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is None and request.method == "POST":  # a chunked body would pass uncounted
            return JSONResponse({"error": "LengthRequired", "detail": "send a Content-Length"}, 411)
        if length is not None and (not length.isdigit() or int(length) > limit):
            return JSONResponse({"error": "TooLarge", "detail": f"request body over {limit:,} bytes"}, 413)
        return await call_next(request)

    return check
