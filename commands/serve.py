"""Serve a page and AUTOMATIC1111's API (/sdapi/v1/*) on the generation code of sample.py.

python -m commands.serve                       # the shipped model, http://127.0.0.1:7860
python -m commands.serve --models-dir models --lora-dir loras --outdir outputs/server
python -m commands.serve --listen --api-auth me:secret   # on every address: a password is required

Every image is written to --outdir as sample.py writes it (PNG with its settings, manifest.jsonl);
the page's gallery shows that folder. One request is drawn at a time; a request arriving while
--queue others wait gets a 503.
"""

import sys
from pathlib import Path

from commands.cli import Parser, UsageError, check_writable, fail, one_line_warnings, quiet_libraries
from ldm.errors import UserError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"


def make_parser() -> Parser:
    parser = Parser(prog="serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the model drawn with by default (default: the shipped model)")
    parser.add_argument("--models-dir", type=Path, help="more models to pick from: diffusers folders, single files")
    parser.add_argument("--lora-dir", type=Path, help="LoRA files for <lora:NAME:SCALE> in prompts")
    parser.add_argument("--controlnet-dir", type=Path, help="ControlNets for alwayson_scripts.controlnet units")
    parser.add_argument(
        "--embeddings-dir", type=Path, help="textual-inversion embeddings: a prompt word naming a file reads it"
    )
    parser.add_argument("--outdir", type=Path, default=Path("outputs") / "server", help="where images are written")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    parser.add_argument("--listen", action="store_true", help="listen on every address (0.0.0.0): needs --api-auth")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--api-auth", metavar="USER:PASS", help="HTTP basic auth for every request")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    parser.add_argument("--queue", type=int, default=16, help="requests that may wait for the one being drawn")
    limits = parser.add_argument_group("limits of one request")
    limits.add_argument("--max-steps", type=int, default=150)
    limits.add_argument("--max-side", type=int, default=2048, help="pixels, of the width and of the height")
    limits.add_argument("--max-images", type=int, default=16, help="batch_size x n_iter")
    limits.add_argument("--max-batch", type=int, default=8)
    limits.add_argument("--max-body-mb", type=int, default=32, help="of a request body")
    limits.add_argument("--max-controlnets", type=int, default=3, help="ControlNet units")
    return parser


def parse(argv: list[str] | None):
    args = make_parser().parse_args(argv)
    args.model = args.model or DEFAULT_MODEL
    if not args.model.exists():
        raise UsageError(f"--model {args.model}: no such file or folder")
    folders = (
        ("--models-dir", args.models_dir),
        ("--lora-dir", args.lora_dir),
        ("--embeddings-dir", args.embeddings_dir),
    )
    for flag, folder in folders:
        if folder is not None and not folder.is_dir():
            raise UsageError(f"{flag} {folder}: no such folder")
    if args.api_auth is not None and ":" not in args.api_auth:
        raise UsageError("--api-auth: write USER:PASS")
    if args.listen:
        if args.api_auth is None:
            raise UsageError("--listen serves every address: give --api-auth USER:PASS as well")
        args.host = "0.0.0.0"
    for name in ("port", "queue", "max_steps", "max_side", "max_images", "max_batch", "max_body_mb", "max_controlnets"):
        if getattr(args, name) < (0 if name == "queue" else 1):
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    check_writable(args.outdir, f"--outdir {args.outdir}")
    return args


def build(args):
    """The app for the parsed arguments (the tests build it the same way)."""
    from server.app import Server, make_app
    from server.limits import Limits
    from server.worker import Worker

    limits = Limits(args.max_steps, args.max_side, args.max_images, args.max_batch, args.max_body_mb << 20,
                    controlnets=args.max_controlnets)  # fmt: skip
    worker = Worker(args.outdir, args.device, args.dtype, args.queue, limits, args.embeddings_dir)
    server = Server(worker, args.model, args.models_dir, args.lora_dir, limits, args.controlnet_dir)
    auth = None if args.api_auth is None else tuple(args.api_auth.split(":", 1))
    return make_app(server, auth)


def main(argv: list[str] | None = None) -> int:
    one_line_warnings("serve")
    try:
        args = parse(argv)
    except UserError as error:
        return fail("serve", error)
    import uvicorn

    quiet_libraries()
    app = build(args)
    print(f"serve: http://{args.host}:{args.port}/  (A1111 API at /sdapi/v1/, images to {args.outdir})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
