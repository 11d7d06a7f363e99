"""Generate images from prompts.

    python sample.py --prompt "a large red circle in the top left" --model path/or/hub-id

Writes numbered PNGs carrying their parameters, and a grid, to a new folder under outputs/.
"""

import argparse
import sys
import time
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ldm.model import ModelLoadError
from ldm.unet import ConfigError
from pipelines.cli import Parser, UsageError, quiet_libraries
from pipelines.devices import DeviceError
from pipelines.outputs import RunSettings, write_run
from pipelines.schedulers import SCHEDULERS, UnknownScheduler
from pipelines.text_to_image import GenerationError, TextToImagePipeline

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "default"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="sample.py", description=__doc__.splitlines()[0])
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="the text to draw; (word:1.3) emphasis, any length")
    prompts.add_argument("--prompt-file", type=Path, help="one prompt per line")
    parser.add_argument("--model", help="model folder, hub id, or SD .safetensors/.ckpt (default: the shipped model)")
    parser.add_argument("--negative-prompt", default="", help="what to steer away from")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--batch-size", type=int, default=1, help="images generated at once")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), metavar="NAME", help=", ".join(SCHEDULERS))
    parser.add_argument("--seed", type=int, help="image k uses seed+k (default: random)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--outdir", type=Path, help="default: a new folder under outputs/")
    parser.add_argument("--init-image", type=Path, help="start from this picture (image-to-image)")
    parser.add_argument("--strength", type=float, default=0.8, help="how far to move from the init image, 0..1")
    parser.add_argument("--mask", type=Path, help="inpaint: white is repainted, black kept (needs --init-image)")
    parser.add_argument(
        "--lora",
        type=lora_argument,
        action="append",
        default=[],
        metavar="F[:SCALE]",
        help="merge a LoRA .safetensors (diffusers or kohya), scale 1 unless given; repeatable",
    )
    parser.add_argument("--attention-maps", action="store_true", help="write a heatmap per prompt token")
    parser.add_argument("--truncate-prompts", action="store_true", help="cut prompts at 75 tokens instead of chunking")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow start, faster steps)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in tiles: large images in less memory")
    return parser.parse_args(argv)


def lora_argument(value: str) -> tuple[str, float]:
    """'style.safetensors:0.7' -> (file, 0.7); a path alone has scale 1."""
    path, _, scale = value.rpartition(":")
    try:
        return (path, float(scale)) if path else (value, 1.0)
    except ValueError:
        return value, 1.0


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    try:
        lines = args.prompt_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--prompt-file {args.prompt_file}: cannot read it ({error.__class__.__name__})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"--prompt-file {args.prompt_file}: no prompts in it")
    return prompts


def read_image(path: Path | None, flag: str) -> Image.Image | None:
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError):
        raise UsageError(f"{flag} {path}: not a readable image") from None


def model_source(args: argparse.Namespace) -> str:
    if args.model is None:
        if not DEFAULT_MODEL.is_dir():
            raise UsageError("no default model is installed yet; pass --model PATH_OR_HUB_ID")
        return str(DEFAULT_MODEL)
    looks_local = args.model.startswith((".", "/", "~")) or args.model.endswith((".safetensors", ".ckpt"))
    if looks_local and not Path(args.model).expanduser().exists():
        raise UsageError(f"--model {args.model}: no such file or folder")
    return str(Path(args.model).expanduser()) if looks_local else args.model


def new_outdir() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidates = (Path("outputs") / (stamp if i == 0 else f"{stamp}-{i}") for i in range(1000))
    return next(path for path in candidates if not path.exists())


def run(args: argparse.Namespace) -> list[Path]:
    if args.outdir is not None and args.outdir.exists() and not args.outdir.is_dir():
        raise UsageError(f"--outdir {args.outdir}: exists and is not a folder")
    prompts = read_prompts(args)
    init_image, mask = read_image(args.init_image, "--init-image"), read_image(args.mask, "--mask")
    for path, _ in args.lora:
        if not Path(path).is_file():
            raise UsageError(f"--lora {path}: no such file")
    source = model_source(args)
    pipe = TextToImagePipeline.from_pretrained(
        source, device=args.device, dtype=args.dtype, compile=args.compile, vae_tiling=args.vae_tiling
    )
    for path, scale in args.lora:
        pipe.load_lora(path, scale)
    scheduler = args.scheduler or pipe.default_scheduler
    generated = pipe.generate(
        prompts,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        batch_size=args.batch_size,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        scheduler=scheduler,
        seed=args.seed,
        height=args.height,
        width=args.width,
        init_image=init_image,
        strength=args.strength,
        mask=mask,
        attention_maps=args.attention_maps,
        truncate=args.truncate_prompts,
    )
    strength = args.strength if init_image is not None else None
    settings = RunSettings(source, args.steps, scheduler, args.guidance_scale, strength, tuple(args.lora))
    return write_run(args.outdir or new_outdir(), generated, settings)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    try:
        written = run(parse(argv))
    except (UsageError, ModelLoadError, ConfigError, GenerationError, UnknownScheduler, DeviceError) as error:
        print(f"sample.py: error: {error}", file=sys.stderr)
        return 2
    images = [p for p in written if "-attention-" not in p.name and not p.name.endswith("-grid.png")]
    print(f"wrote {len(images)} image(s) to {written[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
