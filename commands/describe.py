"""Print a model's architecture and parameter counts per part (the library: ldm/describe.py).

python -m commands.describe sdxl            # a preset: its shapes, no weights allocated
python -m commands.describe path/to/model   # a saved model folder or hub id
"""

import sys
from pathlib import Path

import torch

from commands.cli import Parser, fail
from ldm.describe import describe
from ldm.errors import UserError
from ldm.model import LatentDiffusion


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="describe", description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", help="preset name (tiny, small, sd15, sd21, sdxl, sdxl-tiny), preset .yaml, model folder or hub id"
    )
    try:
        args = parser.parse_args(argv)
        if Path(args.model).is_dir() or "/" in args.model and not args.model.endswith((".yaml", ".yml")):
            model, origin = LatentDiffusion.load(args.model), "loaded"
        else:
            with torch.device("meta"):  # counting needs the shapes only: SDXL's 3.5 billion weights take no memory
                model, origin = LatentDiffusion.from_preset(args.model), "preset"
    except UserError as error:
        return fail("describe", error)
    print(f"{args.model} ({origin})")
    print(describe(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
