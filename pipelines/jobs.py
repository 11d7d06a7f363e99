"""A run as a list of jobs, one per image, and its share for each process.

Image k of a run (k counts over every prompt's images, in order) draws prompt k // num_images with
seed S + k, and is written under number first + k. Nothing about an image depends on which process
draws it, so `accelerate launch --num_processes N sample.py ...` splits the jobs with Accelerate's
`PartialState.split_between_processes` and writes the files one process would write (pixel for pixel
at batch size 1; in larger batches a CPU kernel may round an image otherwise beside other images).
"""

from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, NamedTuple

from PIL import Image

from pipelines.settings import Generated, GenerationConfig

if TYPE_CHECKING:
    from pipelines.text_to_image import TextToImagePipeline


class Job(NamedTuple):
    index: int  # in the whole run: fixes the seed and the file's number
    prompt: str
    seed: int


def plan(prompts: list[str], num_images: int, seed: int) -> list[Job]:
    """Every image of the run, in order: each prompt's `num_images`, image k with seed `seed + k`."""
    return [Job(k, prompt, seed + k) for k, prompt in enumerate(p for p in prompts for _ in range(num_images))]


def runs_of_seeds(jobs: list[Job]) -> Iterator[list[Job]]:
    """The jobs cut where the seeds stop running on by one: each piece is one pipeline call, whose
    image j takes the piece's first seed + j."""
    piece: list[Job] = []
    for job in jobs:
        if piece and job.seed != piece[-1].seed + 1:
            yield piece
            piece = []
        piece.append(job)
    if piece:
        yield piece


def generate_jobs(
    pipe: "TextToImagePipeline",
    jobs: list[Job],
    config: GenerationConfig,
    init_image: Image.Image | None = None,
    mask: Image.Image | None = None,
    control: list | None = None,
) -> Iterator[tuple[Job, Generated]]:
    """Each job's image as soon as its batch is done: one pipeline call per run of consecutive seeds,
    `config.batch_size` images at a time."""
    for piece in runs_of_seeds(jobs):
        options = asdict(replace(config, num_images=1, seed=piece[0].seed))
        yield from zip(
            piece,
            pipe.generate_each([job.prompt for job in piece], init_image, mask, control=control, **options),
            strict=True,
        )
