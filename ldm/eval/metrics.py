"""CLIP score and FID for models trained on real data, through torchmetrics, with weights the user
has locally (nothing is downloaded here).

    python -m ldm.eval.metrics --model runs/my-model/model --prompt-file prompts.txt \\
        --clip-model path/to/clip-vit-large-patch14 --reference-dir my-images [--inception-weights pt_inception.pth]

CLIP score: 100 x the cosine similarity of image and prompt embeddings (higher follows the text
better). FID: the Fréchet distance between Inception features of generated and reference
images (lower is closer to the data); it needs the torch-fidelity package for the Inception
network, and its weights file when offline. Like sample.py this is a command line over the
pipelines, so it imports them.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from ldm.data.datasets import IMAGE_SUFFIXES
from ldm.data.transforms import to_rgb
from ldm.errors import UserError


def as_uint8(images: list[Image.Image], size: int | None = None) -> Tensor:
    """PIL images -> (N, 3, H, W) uint8, resized to size x size when given."""
    arrays = []
    for image in images:
        image = to_rgb(image)
        if size is not None:
            image = image.resize((size, size), Image.BICUBIC)
        arrays.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(arrays)


class FeaturesAsTensors(nn.Module):
    """transformers 5's get_*_features return output objects; torchmetrics expects the tensors."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args) -> Tensor:
        return _tensor(self.model.get_image_features(*args))

    def get_text_features(self, *args) -> Tensor:
        return _tensor(self.model.get_text_features(*args))


def _tensor(output) -> Tensor:
    return output if isinstance(output, Tensor) else output.pooler_output


def clip_score(images: list[Image.Image], prompts: list[str], clip_model: str) -> float:
    """`clip_model`: a local folder with a transformers CLIPModel and CLIPProcessor."""

    def load() -> tuple[nn.Module, CLIPProcessor]:  # torchmetrics takes hub names, or a loader
        return FeaturesAsTensors(CLIPModel.from_pretrained(clip_model)), CLIPProcessor.from_pretrained(clip_model)

    metric = CLIPScore(model_name_or_path=load)
    metric.update(as_uint8(images), prompts)
    return float(metric.compute())


def fid(
    generated: list[Image.Image], reference: list[Image.Image], feature: int | nn.Module = 2048, **options
) -> float:
    """`feature` is the Inception feature width (torch-fidelity's network), or a module of one's own."""
    metric = FrechetInceptionDistance(feature=feature, **options)
    size = min(image.width for image in generated)
    metric.update(as_uint8(reference, size), real=True)
    metric.update(as_uint8(generated, size), real=False)
    return float(metric.compute())


def read_images(folder: Path) -> list[Image.Image]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise UserError(f"--reference-dir {folder}: needs at least 2 images, found {len(files)}")
    return [Image.open(p) for p in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.eval.metrics", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-file", type=Path, required=True, help="one prompt per line")
    parser.add_argument("--clip-model", help="a local CLIP model folder (transformers CLIPModel)")
    parser.add_argument("--reference-dir", type=Path, help="real images to compare with (FID)")
    parser.add_argument("--inception-weights", help="torch-fidelity's Inception weights file, for offline FID")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    from pipelines.text_to_image import TextToImagePipeline  # an entry point, like sample.py

    try:
        if not (args.clip_model or args.reference_dir):
            raise UserError("give --clip-model (CLIP score), --reference-dir (FID), or both")
        prompts = [line.strip() for line in args.prompt_file.read_text().splitlines() if line.strip()]
        reference = read_images(args.reference_dir) if args.reference_dir else None
        pipe = TextToImagePipeline.from_pretrained(args.model)
        images = pipe(
            prompts, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size
        )
        results = {"images": len(images)}
        if args.clip_model:
            results["clip_score"] = round(clip_score(images, prompts, args.clip_model), 3)
        if reference is not None:
            results["fid"] = round(fid(images, reference, feature_extractor_weights_path=args.inception_weights), 3)
    except (UserError, OSError, ModuleNotFoundError) as error:
        print(f"metrics: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
