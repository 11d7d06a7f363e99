"""The DreamBooth demonstration on the demo model (docs/fine-tuning.md): bind "sks" to hollow shapes
(outlines, a style the model never saw), with and without prior preservation, and measure both
sides: how often "a sks shape" comes out hollow, and how much "a shape" (the class prompt) moved
from the base model's pictures (hollow ones, and the change per pixel). DreamBooth as its paper
runs it: the whole UNet and the text encoder train (`stage: diffusion`). Writes OUT/sheet.png:
rows of "a sks shape" and "a shape" from the base model, with prior preservation, and without.

    python scripts/dreambooth_demo.py --out runs/dreambooth-demo      # about 20 minutes on 2 cores
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from commands.make_shapes import main as make_shapes  # noqa: E402
from ldm.eval.detector import detect  # noqa: E402
from pipelines.text_to_image import TextToImagePipeline  # noqa: E402

INSTANCE, CLASS = "a sks shape", "a shape"


def draw(model: Path, prompt: str, count: int) -> list[np.ndarray]:
    pipe = TextToImagePipeline.from_pretrained(model, device="cpu", dtype="fp32")
    images = pipe([prompt] * count, seed=1000, batch_size=32, progress=False)  # image k: seed 1000 + k
    return [np.asarray(image.convert("RGB")) for image in images]


def contact_sheet(models: list[Path], path: Path, count: int = 12) -> None:
    """One row per model and prompt (the instance's, then the class's): the first `count` pictures."""
    rows = [np.concatenate(draw(model, prompt, count), axis=1) for model in models for prompt in (INSTANCE, CLASS)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def hollow_share(images: list[np.ndarray]) -> float:
    return 100 * float(np.mean([any(d.hollow for d in detect(image)) for image in images]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/dreambooth-demo"))
    parser.add_argument("--images", type=int, default=64, help="pictures per prompt measured")
    args = parser.parse_args()
    data = args.out / "instance"
    make_shapes(["--out", str(data), "--n", "30", "--seed", "5", "--outline", "2", "--two-objects", "0"])
    common = ["--config", "configs/shapes-lora.yaml", "stage=diffusion", "diffusion.train_text_encoder=true",
              "diffusion.caption_dropout=0", "optim.learning_rate=5e-4", "steps.max=800", "checkpoint.every=400",
              f"data.path={data}", f"dreambooth.instance_prompt={INSTANCE}", "validation.prompts=[]",
              "data.cache_latents=false"]  # fmt: skip
    runs = {
        "prior": [f"output_dir={args.out / 'prior'}", f"dreambooth.class_prompt={CLASS}",
                  "dreambooth.class_images=60", f"dreambooth.class_dir={args.out / 'class-images'}"],
        "no prior": [f"output_dir={args.out / 'no-prior'}"],
    }  # fmt: skip
    for name, options in runs.items():
        start = time.perf_counter()
        assert train.main([*common, *options]) == 0
        print(f"{name}: trained in {time.perf_counter() - start:.0f} s")
    base = Path("models/default")
    base_class = draw(base, CLASS, args.images)
    print(f"base model: '{INSTANCE}' hollow {hollow_share(draw(base, INSTANCE, args.images)):.1f}%, "
          f"'{CLASS}' hollow {hollow_share(base_class):.1f}%")  # fmt: skip
    for name, folder in (("prior", "prior"), ("no prior", "no-prior")):
        model = args.out / folder / "model"
        after = draw(model, CLASS, args.images)
        moved = np.mean([np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(after, base_class, strict=True)])
        instance = hollow_share(draw(model, INSTANCE, args.images))
        print(f"{name}: '{INSTANCE}' hollow {instance:.1f}%, '{CLASS}' hollow {hollow_share(after):.1f}%, "
              f"'{CLASS}' moved {moved:.1f}/255 per pixel from the base")  # fmt: skip
    contact_sheet([base, args.out / "prior" / "model", args.out / "no-prior" / "model"], args.out / "sheet.png")


if __name__ == "__main__":
    main()
