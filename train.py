"""Train a latent diffusion model (or its autoencoder) on image-caption pairs.

    python train.py --config configs/shapes-diffusion.yaml [dotted.key=value ...]
    accelerate launch train.py --config ...      # or: torchrun --nproc_per_node N train.py --config ...

Writes to output_dir: config.yaml (the resolved recipe), checkpoints/, logs/ (TensorBoard),
validation/ (sample grids), and at the end model/ (EMA weights, diffusers layout).
"""

from __future__ import annotations

import signal
import sys

from commands.cli import Parser, check_writable, interrupts_while_starting, quiet_libraries

if __name__ == "__main__":  # before torch, diffusers and transformers load
    interrupts_while_starting("train.py")

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.errors import UserError

if TYPE_CHECKING:  # torch, diffusers and transformers load in main(), once the arguments are parsed
    import torch
    from PIL import Image

    from ldm.model import LatentDiffusion
    from ldm.train.config import TrainConfig
    from ldm.train.loop import Validate
    from ldm.train.stages import Draw


def sampler(config: TrainConfig) -> Validate | None:
    """Validation: the recipe's prompts, sampled with fixed seeds into one grid; with control images
    (stage=controlnet), each prompt's control image beside its picture, a row each."""
    validation = config.validation
    if config.stage == "autoencoder" or not validation.prompts:
        return None

    def validate(model: LatentDiffusion, step: int, device: torch.device, options: dict) -> Image.Image:
        from ldm.images import read_image
        from ldm.model import dtype_name
        from pipelines.control import Control
        from pipelines.outputs import grid
        from pipelines.text_to_image import TextToImagePipeline

        # in the UNet's own precision: a LoRA run's frozen half-precision weights are not copied to fp32
        dtype = dtype_name(model.unet.conv_in.weight.dtype)
        pipe = TextToImagePipeline(model, device=str(device.type), dtype=dtype)
        if "embeddings" in options:  # textual inversion: the word as it is now
            pipe.load_embeddings(options["embeddings"])
        settings = dict(steps=validation.steps, guidance_scale=validation.guidance_scale, seed=validation.seed,
                        height=config.data.resolution, width=config.data.resolution, progress=False)  # fmt: skip
        if not validation.control_images:
            return grid(pipe(validation.prompts, **settings))
        controls = [read_image(Path(path).expanduser(), path).convert("RGB") for path in validation.control_images]
        images = []
        for k, (prompt, control) in enumerate(zip(validation.prompts, controls, strict=True)):
            units = [Control(options["controlnet"], control)] if "controlnet" in options else []  # step 0: the base's
            images += pipe([prompt], control=units, **(settings | {"seed": validation.seed + k}))
        rows = zip(controls, images, strict=True)
        return grid([picture for control, image in rows for picture in (control.resize(image.size), image)], columns=2)

    return validate


def painter(config: TrainConfig) -> Draw:
    """DreamBooth's class images: the base model's own pictures of the class prompt, at the
    training resolution and the model's sampling defaults (sampling.json, else the pipeline's)."""

    def draw(model: LatentDiffusion, prompts: list[str], seed: int, device: torch.device) -> list[Image.Image]:
        from pipelines.text_to_image import TextToImagePipeline

        pipe = TextToImagePipeline(model, device=str(device.type), dtype="fp32")
        size = config.data.resolution
        return pipe(prompts, seed=seed, height=size, width=size, progress=False)

    return draw


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # started: Ctrl-C is KeyboardInterrupt again
    parser = Parser(prog="train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a recipe in configs/")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. optim.learning_rate=2e-4")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ldm").setLevel(logging.INFO)
    try:
        args = parser.parse_args(argv)
        from ldm.train.config import load_config  # the libraries load here, once the arguments are parsed
        from ldm.train.loop import Trainer

        quiet_libraries()
        config = load_config(args.config, args.overrides)
        check_writable(Path(config.output_dir), f"output_dir={config.output_dir}")
        Trainer(config, validate=sampler(config), draw=painter(config)).run()
    except UserError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted; finished checkpoints are kept (continue with checkpoint.resume=latest)",
              file=sys.stderr)  # fmt: skip
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
