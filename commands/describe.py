"""Print a model's architecture and parameter counts per part (the library: ldm/describe.py).

python -m commands.describe sd15            # a preset, built with random weights
python -m commands.describe path/to/model   # a saved model folder or hub id
"""

import sys
from pathlib import Path

from commands.cli import Parser, fail
from ldm.describe import describe
from ldm.errors import UserError
from ldm.model import LatentDiffusion


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="describe", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="preset name (tiny, small, sd15, sd21), preset .yaml, model folder or hub id")
    try:
        args = parser.parse_args(argv)
        if Path(args.model).is_dir() or "/" in args.model and not args.model.endswith((".yaml", ".yml")):
            model, origin = LatentDiffusion.load(args.model), "loaded"
        else:
            model, origin = LatentDiffusion.from_preset(args.model), "random weights"
    except UserError as error:
        return fail("describe", error)
    print(f"{args.model} ({origin})")
    print(describe(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
