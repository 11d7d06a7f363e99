"""Does an autoencoder's latent space add colour and shape? (the probe: ldm/eval/additivity.py)

python -m commands.eval_additivity --model runs/shapes-autoencoder/model
"""

import json
import sys
from pathlib import Path

from diffusers import AutoencoderKL

from commands.cli import Parser, fail
from ldm.data.shapes import parse_pairs
from ldm.errors import UserError
from ldm.eval.additivity import probe
from ldm.eval.judge import DEFAULT_LEFT_OUT


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="eval_additivity", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder whose VAE to probe (an autoencoder run's)")
    parser.add_argument("--left-out", default=DEFAULT_LEFT_OUT, help="the pairs the VAE never saw")
    try:
        args = parser.parse_args(argv)
        left_out = parse_pairs(args.left_out, "--left-out")
        if not Path(args.model, "vae").is_dir():
            raise UserError(f"--model {args.model}: no vae/ folder there")
        vae = AutoencoderKL.from_pretrained(Path(args.model, "vae")).float().eval()
    except UserError as error:
        return fail("eval_additivity", error)
    print(json.dumps(probe(vae, left_out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
