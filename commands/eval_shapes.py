"""How faithfully a model trained on the shapes dataset follows the text (the library, detector and
judge: ldm/eval/). This command draws the images, so it sits above the pipelines.

    python -m commands.eval_shapes --model runs/shapes-diffusion/model [--seeds 2] [--out eval-shapes]
    python -m commands.eval_shapes --model models/default --colors purple=128,0,255 --lora runs/purple/lora.safetensors
    python -m commands.eval_shapes --model models/default --controlnet runs/shapes-controlnet/controlnet

With --controlnet, every prompt is drawn with its scene's layout as the control image (each shape's box
filled with its colour, as `make_shapes --layouts` draws it), one image at a time.
"""

import json
import sys
from pathlib import Path

from commands.cli import Parser, fail
from ldm.autoencoder import downsampling_factor
from ldm.data.shapes import choose_colors, parse_pairs
from ldm.errors import UserError
from ldm.eval.judge import DEFAULT_LEFT_OUT, contact_sheet, evaluate, prompt_set, scene_layout, summarise
from pipelines.control import Control
from pipelines.text_to_image import TextToImagePipeline


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="eval_shapes", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder trained on the shapes dataset")
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=2.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--left-out", default=DEFAULT_LEFT_OUT, help="the pairs the model never saw")
    parser.add_argument("--out", type=Path, default=Path("eval-shapes"), help="contact sheet and results.json")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", help="fp32 (the figures in docs/), bf16, fp16 or auto")
    parser.add_argument("--colors", help="extra colours, as make_shapes takes them: purple=128,0,255")
    parser.add_argument("--only-colors", help="prompts of these colours only, e.g. purple")
    parser.add_argument("--lora", type=Path, help="a LoRA .safetensors merged into the model (scale 1)")
    parser.add_argument("--embeddings", type=Path, help="textual-inversion embeddings the prompts may name")
    parser.add_argument("--controlnet", type=Path, help="a layout ControlNet: each prompt drawn with its layout")
    parser.add_argument("--control-scale", type=float, default=1.0, help="the ControlNet's weight")
    parser.add_argument("--attend", help="Attend-and-Excite on these words, or auto (each 'a COLOR SHAPE' of two)")

    def generate(prompts: list[str], round_: int):
        """Image k of round r uses seed r * len(prompts) + k: every image its own seed, reproducibly."""
        options = dict(steps=args.steps, guidance_scale=args.guidance_scale, attention_maps=True, progress=False,
                       attend=args.attend)  # fmt: skip
        if controls is None:
            run = pipe.generate(prompts, batch_size=args.batch_size, seed=round_ * len(prompts), **options)
        else:  # a control image of its own for each prompt: one at a time
            run = [generated for k, prompt in enumerate(prompts)
                   for generated in pipe.generate(prompt, seed=round_ * len(prompts) + k, control=[controls[prompt]],
                                                  **options)]  # fmt: skip
        return [(generated.image, generated.attention_maps) for generated in run]

    try:
        args = parser.parse_args(argv)
        if args.seeds < 1 or args.steps < 1:
            raise UserError(f"--seeds {args.seeds}, --steps {args.steps}: both must be at least 1")
        palette, colors = choose_colors(args.colors, args.only_colors)
        left_out = parse_pairs(args.left_out, "--left-out", palette)
        pipe = TextToImagePipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
        if args.lora:
            pipe.load_lora(args.lora)
        if args.embeddings:
            pipe.load_embeddings(args.embeddings)
        cases = prompt_set(left_out, colors=colors)
        controls = None
        if args.controlnet:
            if not args.controlnet.exists():
                raise UserError(f"--controlnet {args.controlnet}: no such folder or file")
            controlnet = pipe.load_controlnet(args.controlnet)
            side = (pipe.model.unet.config.sample_size or 64) * downsampling_factor(pipe.model.vae)
            controls = {
                case.prompt: Control(controlnet, scene_layout(case, side, k, palette), args.control_scale)
                for k, case in enumerate(cases)
            }
        # every prompt's settings are checked before the first image (an --attend word one lacks)
        verdicts = evaluate(generate, cases, args.seeds, palette)
    except UserError as error:
        return fail("eval_shapes", error)

    summary = summarise(verdicts)
    if args.controlnet:
        summary["controlnet"] = {"path": str(args.controlnet), "scale": args.control_scale}
    if args.attend:
        summary["attend"] = args.attend
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    contact_sheet(verdicts).save(args.out / "contact-sheet.png")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
