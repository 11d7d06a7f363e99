"""What Attend-and-Excite costs on the demo model: the shapes evaluation's 24 two-object prompts, and
as many of its single-object ones, each set in one batch at the evaluation's settings (25 DDIM steps,
guidance 2.5, fp32), drawn without and with `attend="auto"`, interleaved in one run.

    python scripts/bench_attend.py [--model models/default] [--rounds 2]

Prints seconds per image for each and their ratio. `auto` leaves a lone object alone, so the
single-object ratio should be 1. Not a test: figures go to BENCHMARKS.md.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.data.shapes import parse_pairs  # noqa: E402
from ldm.eval.judge import DEFAULT_LEFT_OUT, prompt_set  # noqa: E402
from pipelines.text_to_image import TextToImagePipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/default")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    pipe = TextToImagePipeline.from_pretrained(args.model, device="cpu", dtype="fp32")
    cases = prompt_set(parse_pairs(DEFAULT_LEFT_OUT, "--left-out"))
    two = [case.prompt for case in cases if case.kind == "two-objects"]
    sets = {"two objects": two, "single objects": [case.prompt for case in cases if case.kind == "seen"][: len(two)]}
    settings = dict(steps=25, guidance_scale=2.5, batch_size=len(two), seed=0, progress=False)
    pipe.generate(two[:2], **{**settings, "steps": 2})  # warm-up
    times = {(name, attend): [] for name in sets for attend in (None, "auto")}
    for _ in range(args.rounds):
        for (name, attend), spent in times.items():  # interleaved: a slow spell hits both
            start = time.perf_counter()
            pipe.generate(sets[name], attend=attend, **settings)
            spent.append((time.perf_counter() - start) / len(sets[name]))
    for name in sets:
        plain, attend = times[name, None], times[name, "auto"]
        print(f"{name}: plain {' '.join(f'{t:.3f}' for t in plain)} s/image, "
              f"attend auto {' '.join(f'{t:.3f}' for t in attend)} s/image, "
              f"ratio {min(attend) / min(plain):.2f} (best of {args.rounds})")  # fmt: skip


if __name__ == "__main__":
    main()
