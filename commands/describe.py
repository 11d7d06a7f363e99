"""Print a model's architecture and parameter counts per part (the library: ldm/describe.py).

python -m commands.describe sdxl            # a preset: its shapes, no weights allocated
python -m commands.describe path/to/model   # a saved model folder or hub id
python -m commands.describe sdxl-tiny --save models/sdxl-tiny   # a preset, random weights, as a model folder

A saved preset draws noise (its weights are random), but every command runs on it offline: an
SDXL model to try generation, LoRA files and fine-tuning without the hub.
"""

import sys
from pathlib import Path

import torch

from commands.cli import Parser, UsageError, check_writable, fail, quiet_libraries
from ldm.describe import describe
from ldm.errors import UserError
from ldm.model import LatentDiffusion
from pipelines.devices import describe_device, pick_device, pick_dtype


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="describe", description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", help="preset name (tiny, small, sd15, sd21, sdxl, sdxl-tiny), preset .yaml, model folder or hub id"
    )
    quiet_libraries()
    parser.add_argument("--save", type=Path, metavar="DIR", help="a preset only: build it (random weights) into DIR")
    try:
        args = parser.parse_args(argv)
        loaded = Path(args.model).is_dir() or "/" in args.model and not args.model.endswith((".yaml", ".yml"))
        if args.save is not None:
            if loaded:
                raise UsageError("--save: builds a preset; a model folder is already saved")
            if args.save.exists():
                raise UsageError(f"--save {args.save}: already exists; choose a new folder")
            check_writable(args.save.parent, f"--save {args.save}")
            torch.manual_seed(0)  # the same random weights every time
            model, origin = LatentDiffusion.from_preset(args.model), "preset, random weights"
            model.save(args.save)
        elif loaded:
            model, origin = LatentDiffusion.load(args.model), "loaded"
        else:
            with torch.device("meta"):  # counting needs the shapes only: SDXL's 3.5 billion weights take no memory
                model, origin = LatentDiffusion.from_preset(args.model), "preset"
    except UserError as error:
        return fail("describe", error)
    print(f"{args.model} ({origin})")
    print(describe(model))
    device = pick_device("auto")
    print(f"here, at --dtype auto: {describe_device(device, pick_dtype('auto', device))}")
    if args.save is not None:
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
