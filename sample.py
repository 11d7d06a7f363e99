"""Generate images from prompts.

    python sample.py --prompt "a large red circle in the top left" --model path/or/hub-id
    python sample.py --from-png outputs/<run>/00000-7.png [overrides]

Writes numbered PNGs carrying their parameters to a new folder under outputs/, each as soon as it
is done, a line per image in the folder's manifest.jsonl, and a grid of the run at the end (none for
a single image). Ctrl-C keeps what is written. Many processes or machines share a run's images:

    accelerate launch --num_processes 2 sample.py --prompt-file prompts.txt --seed 0 --outdir out

write the same files one process writes; after a kill, the same command with --skip-existing draws
only the images not yet on file.
"""

import signal
import sys

from commands.cli import (
    Parser,
    UsageError,
    check_writable,
    interrupts_while_starting,
    lora_argument,
    one_line_warnings,
    quiet_libraries,
)

if __name__ == "__main__":  # before torch, diffusers and transformers load
    interrupts_while_starting("sample.py")

import argparse
import random
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from PIL import Image

from commands.from_png import apply_png_settings
from ldm import images
from ldm.errors import UserError
from ldm.files import SINGLE_FILE_SUFFIXES
from pipelines.choices import CONTROL_PREPROCESSORS
from pipelines.model_files import model_hash
from pipelines.settings import MAX_SEED, SDXL, GenerationConfig, declared, value_type

if TYPE_CHECKING:  # torch, diffusers and transformers load in prepare(), once the arguments are checked
    from pipelines.jobs import Job
    from pipelines.outputs import RunWriter
    from pipelines.text_to_image import TextToImagePipeline

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "default"


def make_parser() -> Parser:
    parser = Parser(prog="sample.py", description=__doc__.splitlines()[0])
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", help="the text to draw; (word:1.3) emphasis, BREAK, any length")
    prompts.add_argument("--prompt-file", type=Path, help="one prompt per line")
    parser.add_argument("--from-png", type=Path, help="the settings of a PNG made here (or by A1111); flags override")
    parser.add_argument("--model", help="model folder, hub id, or SD .safetensors/.ckpt (default: the shipped model)")
    parser.add_argument(
        "--models-dir",
        type=Path,
        action="append",
        metavar="DIR",
        help="--from-png looks here and in its subfolders (and beside the shipped model) for the PNG's model, "
        "refiner, LoRAs and ControlNets, by name and hash; repeatable",
    )
    groups = add_settings(parser)
    parser.add_argument("--outdir", type=Path, help="default: a new folder under outputs/")
    parser.add_argument(
        "--skip-existing", action="store_true", help="rerun into --outdir: draw only the images not on file yet"
    )
    parser.add_argument("--init-image", type=Path, help="start from this picture (image-to-image)")
    parser.add_argument("--mask", type=Path, help="inpaint: white is repainted, black kept (needs --init-image)")
    parser.add_argument(
        "--lora",
        type=lora_argument,
        action="append",
        metavar="F[:SCALE]",
        help="merge a LoRA .safetensors (diffusers or kohya), scale 1 unless given; repeatable",
    )
    control = parser.add_argument_group("ControlNet (each flag once per --controlnet, or once for all)")
    control.add_argument(
        "--controlnet", action="append", metavar="PATH", help="a ControlNet: diffusers folder or original file"
    )
    control.add_argument("--control-image", action="append", type=Path, metavar="F", help="what it reads")
    control.add_argument("--control-scale", action="append", type=float, metavar="X", help="default 1")
    control.add_argument("--control-start", action="append", type=float, metavar="X", help="fraction of the steps (0)")
    control.add_argument("--control-end", action="append", type=float, metavar="X", help="fraction of the steps (1)")
    control.add_argument(
        "--control-preprocess", action="append", choices=CONTROL_PREPROCESSORS, help="the image as given, or its edges"
    )
    parser.add_argument(
        "--embeddings",
        metavar="DIR",
        help="textual-inversion embeddings (.pt, .safetensors): a prompt word naming a file here (its stem) reads "
        "its vectors; default: embeddings/ beside the model, else ./embeddings",
    )
    groups[SDXL].add_argument("--refiner", help="an SDXL refiner (folder, hub id or file) that runs the last steps")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    parser.add_argument(
        "--dtype",
        help="auto (bf16 on GPUs and CPUs with bf16 instructions), fp32, fp16 or bf16; default: the precision a "
        "--from-png image or a --skip-existing folder was drawn in, else auto",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow start, faster steps)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in tiles: large images in less memory")
    return parser


def add_settings(parser: Parser) -> dict[str, Any]:
    """A flag per GenerationConfig setting that has one, as its declaration types and describes it
    (default None: a flag left out keeps the config's default, or a PNG's value); the --help sections."""
    groups: dict[str, Any] = {}
    for item, setting in declared():
        if setting.flag is None:
            continue
        if setting.group and setting.group not in groups:
            groups[setting.group] = parser.add_argument_group(setting.group)
        kind = value_type(item)
        options: dict[str, Any] = {"dest": item.name, "help": setting.help}
        if kind is bool:
            options["action"] = "store_true"
        else:
            options |= {"type": int if kind is tuple else kind, "metavar": setting.metavar}
            options |= {"nargs": 2} if kind is tuple else {}
            options |= {"choices": setting.choices} if setting.choices else {}
        flag = "--" + (setting.flag or item.name.replace("_", "-"))
        groups.get(setting.group, parser).add_argument(flag, default=None, **options)
    return groups


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with a PNG's settings filled in and the combinations checked."""
    args = make_parser().parse_args(argv)
    args.ti_hashes = None  # the embeddings a --from-png image used (A1111's "TI hashes")
    args.recorded_dtype = None  # where args.dtype was read from, when a PNG or a folder recorded it
    for folder in args.models_dir or []:
        if not folder.is_dir():
            raise UsageError(f"--models-dir {folder}: no such folder")
    if args.from_png is not None:
        apply_png_settings(args, [DEFAULT_MODEL.parent, *(args.models_dir or [])])
    if args.prompt is None and args.prompt_file is None:
        raise UsageError("one of --prompt, --prompt-file or --from-png is required")
    if args.models_dir is not None and args.from_png is None:
        raise UsageError("--models-dir is where --from-png looks for the PNG's model; name a model with --model")
    if args.strength is not None and args.init_image is None:
        raise UsageError("--strength needs --init-image: it says how far to move from that picture")
    if args.refiner_switch is not None and args.refiner is None:
        raise UsageError("--refiner-switch needs --refiner: it says when the refiner takes over")
    if args.refiner is not None and (args.init_image or args.attention_maps):
        raise UsageError("--refiner: text-to-image only, not with --init-image or --attention-maps")
    args.config = generation_config(args)  # every setting checked, before the libraries load
    if args.skip_existing and (args.outdir is None or args.config.seed is None):
        raise UsageError("--skip-existing needs --outdir and --seed: the folder and the seeds of the run to finish")
    return args


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
    return None if path is None else images.read_image(path, f"{flag} {path}")


def model_source(args: argparse.Namespace) -> str:
    if args.model is None:
        if not DEFAULT_MODEL.is_dir():
            raise UsageError("no default model is installed yet; pass --model PATH_OR_HUB_ID")
        return str(DEFAULT_MODEL)
    return checked_source(args.model, "--model")


class ControlSpec(NamedTuple):
    """One ControlNet unit as the command line gives it (checked before the libraries load)."""

    path: str
    image: Image.Image
    scale: float
    start: float
    end: float
    preprocess: str


def control_specs(args: argparse.Namespace) -> list[ControlSpec]:
    """The --controlnet units: a control image each; scale, start, end and preprocessing given once
    per ControlNet, once for all, or not at all."""
    paths, images = args.controlnet or [], args.control_image or []
    if len(images) != len(paths):
        raise UsageError(f"--controlnet given {len(paths)} time(s), --control-image {len(images)}: one image each")
    columns = []
    flags = (
        ("--control-scale", args.control_scale, 1.0),
        ("--control-start", args.control_start, 0.0),
        ("--control-end", args.control_end, 1.0),
        ("--control-preprocess", args.control_preprocess, "none"),
    )
    for flag, values, default in flags:
        values = values or [default]
        if paths and len(values) not in (1, len(paths)):
            raise UsageError(f"{flag}: give it once, or once per --controlnet ({len(paths)})")
        columns.append(values * len(paths) if len(values) == 1 else values)
    specs = []
    for k, path in enumerate(paths):
        single = Path(path).is_file() and Path(path).suffix in (".safetensors", ".ckpt", ".pth")
        if not (single or (Path(path) / "config.json").is_file()):
            raise UsageError(
                f"--controlnet {path}: neither a diffusers folder (config.json) nor a .safetensors/.pth/.ckpt file"
            )
        scale, start, end, module = (column[k] for column in columns)
        if not (scale >= 0 and 0 <= start < end <= 1):
            raise UsageError(
                f"--controlnet {path}: needs scale >= 0 and 0 <= start < end <= 1 (got {scale}, {start}, {end})"
            )
        specs.append(ControlSpec(path, read_image(images[k], "--control-image"), scale, start, end, module))
    return specs


def embeddings_folder(args: argparse.Namespace, source: str) -> str | None:
    """--embeddings (which must exist), else an embeddings/ folder beside the model, else ./embeddings."""
    if args.embeddings is not None:
        if not Path(args.embeddings).is_dir():
            raise UsageError(f"--embeddings {args.embeddings}: no such folder")
        return args.embeddings
    beside = Path(source).expanduser().resolve().parent / "embeddings"
    found = [folder for folder in (beside, Path("embeddings")) if folder.is_dir()]
    return str(found[0]) if found else None


def checked_source(value: str, flag: str) -> str:
    """A local path that must exist (it looks like one), or a hub id."""
    looks_local = value.startswith((".", "/", "~")) or value.endswith(SINGLE_FILE_SUFFIXES)
    if looks_local and not Path(value).expanduser().exists():
        raise UsageError(f"{flag} {value}: no such file or folder")
    return str(Path(value).expanduser()) if looks_local else value


def new_outdir() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidates = (Path("outputs") / (stamp if i == 0 else f"{stamp}-{i}") for i in range(1000))
    return next(path for path in candidates if not path.exists())


class Run(NamedTuple):
    """What this process draws: its share of the run's images (jobs), the pictures to start from, and
    the settings, resolved once."""

    jobs: list["Job"]  # every image of the run
    share: list["Job"]  # those this process draws: all of them, or its part of those not on file yet
    process: str  # "" alone; "process 1 of 2: " when several share the run
    init_image: Image.Image | None
    mask: Image.Image | None
    config: "GenerationConfig"
    control: list  # pipelines.control.Control units


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The flags named as GenerationConfig's fields, as one object; flags left out keep its defaults."""
    given = {item.name: getattr(args, item.name, None) for item, _ in declared()}
    return GenerationConfig(**{name: value for name, value in given.items() if value is not None})


def prepare(args: argparse.Namespace) -> tuple["TextToImagePipeline", "RunWriter", Run]:
    """Check every input, then load the libraries and the model: the pipeline, the writer, and this
    process's share of the run. Launched as several processes, they agree on the folder, the seed
    and the first number (the main process's), then each takes its part of the images."""
    if args.outdir is not None and args.outdir.exists() and not args.outdir.is_dir():
        raise UsageError(f"--outdir {args.outdir}: exists and is not a folder")
    prompts = read_prompts(args)
    init_image, mask = read_image(args.init_image, "--init-image"), read_image(args.mask, "--mask")
    specs = control_specs(args)
    loras = tuple(args.lora or [])
    for path, _ in loras:
        if not Path(path).is_file():
            raise UsageError(f"--lora {path}: no such file")
    source = model_source(args)
    embeddings = embeddings_folder(args, source)
    refiner = None if args.refiner is None else checked_source(args.refiner, "--refiner")
    check_writable(args.outdir or Path("outputs"), f"--outdir {args.outdir or 'outputs'}")
    # Every input is checked: now torch, diffusers and transformers load (seconds), then the model.
    from accelerate.utils import broadcast_object_list

    from ldm.model import dtype_name
    from pipelines.control import Control, preprocess
    from pipelines.devices import describe_device, start_processes
    from pipelines.embeddings import EmbeddingFolder, check_hashes
    from pipelines.jobs import plan
    from pipelines.outputs import ControlRecord, RunSettings, RunWriter
    from pipelines.text_to_image import TextToImagePipeline

    quiet_libraries()
    if args.ti_hashes:  # --from-png: the embeddings the image used must be here
        check_hashes(embeddings and EmbeddingFolder(embeddings), args.ti_hashes)
    state, device = start_processes(args.device)  # this process, and the others a launcher started, if any
    dtype = run_dtype(args, device)
    outdir, seed, images = args.outdir or new_outdir(), args.config.seed, len(prompts) * args.config.num_images
    seed = random.randrange(MAX_SEED + 1 - images) if seed is None else seed
    outdir, seed = broadcast_object_list([outdir, seed])  # the main process's
    pipe = TextToImagePipeline.from_pretrained(
        source, device=str(device), dtype=dtype, compile=args.compile, vae_tiling=args.vae_tiling
    )
    if state.is_main_process:
        print(f"sample.py: {describe_device(pipe.device, pipe.dtype)}")
    for path, scale in loras:
        pipe.load_lora(path, scale)
    if embeddings is not None:
        pipe.load_embeddings(embeddings)
    controls = [
        Control(pipe.load_controlnet(spec.path), preprocess(spec.image, spec.preprocess), spec.scale, spec.start,
                spec.end)
        for spec in specs
    ]  # fmt: skip
    if refiner is not None:
        pipe.load_refiner(refiner)
    asked = replace(args.config, seed=seed, progress=state.is_main_process)
    config, _ = pipe.resolve(asked, init_image, mask, controls)
    refined = refiner and model_hash(refiner)
    units = tuple(
        ControlRecord(spec.path, spec.scale, spec.start, spec.end, spec.preprocess, model_hash(spec.path, 8))
        for spec in specs
    )
    settings = RunSettings(source, model_hash(source), loras, refiner, refined, tuple(model_hash(p) for p, _ in loras),
                           pipe.ti_hashes, units, dtype_name(pipe.dtype))  # fmt: skip
    writer, jobs = RunWriter(outdir, settings, config), plan(prompts, config.num_images, config.seed)
    done = writer.done(jobs) if args.skip_existing else {}
    numbers = writer.reserve(jobs, done) if state.is_main_process else None
    (writer.first, writer.held), *_ = broadcast_object_list([numbers])  # the main process's
    with state.split_between_processes([job for job in jobs if job.index not in done]) as share:
        process = f"process {state.process_index} of {state.num_processes}: " if state.num_processes > 1 else ""
        return pipe, writer, Run(jobs, share, process, init_image, mask, config, controls)


def run_dtype(args: argparse.Namespace, device) -> str:
    """--dtype; else the precision the --from-png image or the --skip-existing folder was drawn in
    (with a warning where this device only emulates it); else auto."""
    from pipelines.devices import native
    from pipelines.outputs import recorded_dtype

    dtype, source = args.dtype, args.recorded_dtype
    if dtype is None and args.skip_existing:
        dtype, source = recorded_dtype(args.outdir), f"--skip-existing {args.outdir}"
    if source and dtype and not native(dtype, device):
        warnings.warn(f"{source} was drawn in {dtype}, which this {device.type} has no instructions for: drawing "
                      f"in {dtype} all the same, emulated (slower, and the picture may differ slightly); --dtype "
                      "chooses another", stacklevel=3)  # fmt: skip
    return dtype or "auto"


def draw(pipe: "TextToImagePipeline", writer: "RunWriter", run: Run) -> None:
    """This process's images, each written as it is done; the grid by whichever process finishes the
    run's last image."""
    from pipelines.jobs import generate_jobs

    for job, generated in generate_jobs(pipe, run.share, run.config, run.init_image, run.mask, run.control):
        writer.write(generated, job)
    writer.finish(run.jobs)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # started: Ctrl-C is KeyboardInterrupt again
    one_line_warnings("sample.py")
    writer, process = None, ""
    try:
        pipe, writer, run = prepare(parse(argv))
        process = run.process
        draw(pipe, writer, run)
    except UserError as error:
        if writer:
            writer.release()
        print(f"sample.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if writer:
            writer.release()
        kept = f"{writer.written} finished image(s) kept in {writer.outdir}" if writer else "nothing written"
        print(f"sample.py: {process}interrupted; {kept}", file=sys.stderr)
        return 130
    print(f"{process}wrote {writer.written} image(s) to {writer.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
