"""CLIP score and FID of a model's images (the library: ldm/eval/metrics.py).

    python -m commands.eval_metrics --model runs/my-model/model --prompt-file prompts.txt \
        --clip-model path/to/clip --reference-dir my-images --inception-weights pt_inception.pth
    accelerate launch --multi_gpu --num_processes 4 -m commands.eval_metrics ...   # the images drawn by 4

Image k is drawn from prompt k with seed --seed + k by whichever process draws it, so the figures do
not depend on how many processes share the work.
"""

import json
import sys
from pathlib import Path

from accelerate.utils import gather_object

from commands.cli import Parser, fail
from ldm.errors import UserError
from ldm.eval.metrics import clip_score, fid, read_images
from pipelines.devices import start_processes
from pipelines.jobs import generate_jobs, plan
from pipelines.settings import GenerationConfig
from pipelines.text_to_image import TextToImagePipeline


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--prompt-file {path}: cannot read it ({type(error).__name__})") from None


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="eval_metrics", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-file", type=Path, required=True, help="one prompt per line")
    parser.add_argument("--clip-model", help="a local CLIP model folder (transformers CLIPModel)")
    parser.add_argument("--reference-dir", type=Path, help="real images to compare with (FID)")
    parser.add_argument("--inception-weights", help="torch-fidelity's Inception weights file, for offline FID")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU or GPU has it), fp32, fp16, bf16")
    try:
        args = parser.parse_args(argv)
        if not (args.clip_model or args.reference_dir):
            raise UserError("give --clip-model (CLIP score), --reference-dir (FID), or both")
        if args.clip_model and not Path(args.clip_model).is_dir():  # before drawing anything
            raise UserError(f"--clip-model {args.clip_model}: no such folder (a local transformers CLIPModel)")
        prompts = [line.strip() for line in read_text(args.prompt_file).splitlines() if line.strip()]
        reference = read_images(args.reference_dir) if args.reference_dir else None
        state, device = start_processes()  # one process, or those a launcher started: each draws its share
        pipe = TextToImagePipeline.from_pretrained(args.model, device=str(device), dtype=args.dtype)
        config = GenerationConfig(steps=args.steps, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                                  progress=state.is_main_process)  # fmt: skip
        with state.split_between_processes(plan(prompts, 1, args.seed)) as share:  # image k: seed + k
            drawn = [(job.index, generated.image) for job, generated in generate_jobs(pipe, share, config)]
        images = [image for _, image in sorted(gather_object(drawn), key=lambda pair: pair[0])]
        if not state.is_main_process:
            return 0
        results = {"images": len(images)}
        if args.clip_model:
            results["clip_score"] = round(clip_score(images, prompts, args.clip_model), 3)
        if reference is not None:
            results["fid"] = round(fid(images, reference, feature_extractor_weights_path=args.inception_weights), 3)
    except UserError as error:
        return fail("eval_metrics", error)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
