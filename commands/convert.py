"""Convert a model between the diffusers folder layout and one original-format .safetensors file,
merging LoRAs into it and casting it on the way (the library: ldm/single_file.py, ldm/lora.py).

    python -m commands.convert my-model/ my-model.safetensors --dtype fp16       # folder -> one file
    python -m commands.convert sd15.safetensors sd15/                            # one file -> folder
    python -m commands.convert models/default merged.safetensors --preset small \\
        --lora runs/shapes-lora/lora.safetensors:0.8                              # a LoRA merged in

What is written is written beside its name and moved into place at the end; an existing output is
never overwritten.
"""

import sys
from pathlib import Path

from commands.cli import Parser, UsageError, check_writable, fail, lora_argument, quiet_libraries
from ldm.errors import UserError
from ldm.files import SINGLE_FILE_SUFFIXES
from ldm.lora import merge_lora
from ldm.model import DTYPES
from ldm.single_file import load_model, save_single_file


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a diffusers model folder or hub id, or an SD .safetensors/.ckpt file")
    parser.add_argument("output", type=Path, help="NAME.safetensors for one file, any other name for a folder")
    parser.add_argument("--lora", type=lora_argument, action="append", metavar="F[:SCALE]",
                        help="merge a LoRA (kohya or diffusers keys) at SCALE (default 1); repeatable")  # fmt: skip
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="the weights' precision on disk")
    parser.add_argument(
        "--preset", help="a single-file source's architecture (default: sd15, sd21 for OpenCLIP, sdxl or sdxl-refiner)"
    )
    quiet_libraries()
    try:
        args = parser.parse_args(argv)
        check(args)
        model = load_model(args.source, args.preset)
        for path, scale in args.lora or []:
            merge_lora(model, path, scale)
        for part in model.parts().values():
            part.to(DTYPES[args.dtype])
        if args.output.suffix == ".safetensors":
            save_single_file(model, args.output)
        else:
            model.save(args.output)
    except UserError as error:
        return fail("convert", error)
    loras = f", {len(args.lora)} LoRA(s) merged" if args.lora else ""
    print(f"wrote {args.output} ({args.dtype}{loras})")
    return 0


def check(args) -> None:
    """Everything that can be wrong before the model is read."""
    if args.output.exists():
        raise UsageError(f"{args.output}: already exists; choose a new name")
    if args.output.suffix == ".ckpt":
        raise UsageError(f"{args.output}: .ckpt (pickle) is not written; use .safetensors")
    if args.preset and not args.source.endswith(SINGLE_FILE_SUFFIXES):
        raise UsageError("--preset: only for a single-file source (a folder says its own architecture)")
    if args.source.endswith(SINGLE_FILE_SUFFIXES) and not Path(args.source).is_file():
        raise UsageError(f"{args.source}: no such file")
    for path, _ in args.lora or []:
        if not Path(path).is_file():
            raise UsageError(f"--lora {path}: no such file")
    check_writable(args.output.parent, str(args.output))


if __name__ == "__main__":
    sys.exit(main())
