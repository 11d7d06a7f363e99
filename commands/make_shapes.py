"""Write the synthetic shapes dataset (the library: ldm/data/shapes.py).

    python -m commands.make_shapes --out data/shapes --n 5000 --size 64 --seed 0 \
        --leave-out "blue triangle,yellow circle"
    python -m commands.make_shapes --out data/purple --n 200 --colors purple=128,0,255 --only-colors purple
    python -m commands.make_shapes --out data/hollow --n 30 --outline 2     # outlines: a new style
    python -m commands.make_shapes --out data/layouts --n 5000 --layouts     # with each image's layout
"""

import sys
from pathlib import Path

from commands.cli import Parser, fail
from ldm.data.shapes import choose_colors, generate, parse_pairs
from ldm.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="make_shapes", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--size", type=int, default=64, help="side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--leave-out", default="", help="colour-shape pairs never drawn, e.g. 'red circle,blue square'")
    parser.add_argument("--two-objects", type=float, default=0.3, help="fraction of images with two shapes")
    parser.add_argument("--colors", help="extra colours, e.g. purple=128,0,255 (several: comma-separated)")
    parser.add_argument("--only-colors", help="draw only these colours, e.g. purple")
    parser.add_argument("--outline", type=int, default=0, help="draw hollow shapes, edges this many pixels wide")
    parser.add_argument("--layouts", action="store_true", help="also NNNNN_control.png: each shape's box in its colour")
    try:
        args = parser.parse_args(argv)
        palette, colors = choose_colors(args.colors, args.only_colors)
        left_out = parse_pairs(args.leave_out, palette=palette)
        if args.n < 1 or args.size < 16 or not 0 <= args.two_objects <= 1 or args.outline < 0:
            raise UserError(
                "--n must be at least 1, --size at least 16, --two-objects within 0..1, --outline 0 or more"
            )
        if args.out.exists() and any(args.out.iterdir()):
            raise UserError(f"--out {args.out}: exists and is not empty")
    except UserError as error:
        return fail("make_shapes", error)
    generate(
        args.out, args.n, args.size, args.seed, left_out, args.two_objects, palette, colors, args.outline, args.layouts
    )
    print(f"wrote {args.n} images with captions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
