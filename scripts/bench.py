"""Regenerate BENCHMARKS.md's speed and memory tables: ours beside diffusers on the same random weights,
interleaved in one run, on this machine.

    python scripts/bench.py                      # all tables, printed
    python scripts/bench.py --write              # and put into BENCHMARKS.md between its bench.py markers
    python scripts/bench.py --only sdxl --reduced --rounds 1   # a quicker look

Tables: `pipeline`, an SD 1.5-shaped model end to end (prompt to PNG file) at 512², 20 steps,
guidance 7.5: diffusers at its defaults (fp32 on the CPU), diffusers with its weights cast to bf16,
and ours at its defaults (`--dtype auto`); `sdxl`, one guided step of the SDXL-shaped UNet at
1024²; `memory`, peak resident memory of one process: sample.py beside diffusers for the same 512²
job, and loading an SDXL single file in fp16. Not a test: a benchmark prints figures.
"""

import argparse
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from commands.cli import quiet_libraries  # noqa: E402
from ldm.model import LatentDiffusion, dtype_name  # noqa: E402
from pipelines.devices import describe_device, pick_device, pick_dtype  # noqa: E402
from scripts.benchlib import unet_config  # noqa: E402

HEADING = "## Speed and memory beside diffusers (scripts/bench.py)"
PROMPT = "a photograph of an astronaut riding a horse"
TITLES = {"pipeline": "SD 1.5, prompt to PNG", "sdxl": "SDXL UNet step", "memory": "Peak memory"}


def machine() -> str:
    """The CPU (or GPU), its bf16 instructions, threads, torch and diffusers versions, today's date."""
    import diffusers

    device = pick_device("auto")
    where = describe_device(device, pick_dtype("auto", device))
    return f"{where}; torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}"


def best_of(rounds: int, calls: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Each call's best time over `rounds`, the calls interleaved so a slow spell hits all of them."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: min(spent) for name, spent in times.items()}


def sd15_folder(folder: Path) -> Path:
    """An SD 1.5-shaped model with random weights (seed 0), saved as a diffusers folder."""
    if not (folder / "model_index.json").is_file():
        torch.manual_seed(0)
        LatentDiffusion.from_preset("sd15").save(folder)
    return folder


def pipeline_table(folder: Path, args: argparse.Namespace) -> str:
    """Prompt to PNG file, end to end; the first call of each is a warm-up, not timed."""
    from diffusers import StableDiffusionPipeline

    from pipelines.text_to_image import TextToImagePipeline

    ours = TextToImagePipeline.from_pretrained(folder)
    device = ours.device
    theirs = {
        dtype: StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None).to(device)
        for dtype in (torch.float32, torch.bfloat16)
    }
    for pipe in theirs.values():
        pipe.set_progress_bar_config(disable=True)
    options = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size)
    out = Path(tempfile.mkdtemp())

    def diffusers_png(dtype: torch.dtype) -> Callable[[], None]:
        generator = torch.Generator().manual_seed(0)
        return lambda: theirs[dtype](PROMPT, generator=generator, **options).images[0].save(out / "theirs.png")

    def ours_png() -> None:
        (image,) = ours(PROMPT, seed=0, steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size,
                        progress=False)  # fmt: skip
        image.save(out / "ours.png")

    calls = {
        "diffusers, its defaults (fp32)": diffusers_png(torch.float32),
        "diffusers, bf16 weights": diffusers_png(torch.bfloat16),
        f"ours, its defaults ({dtype_name(ours.dtype)})": ours_png,
    }
    best = best_of(args.rounds, calls)
    base, half = best["diffusers, its defaults (fp32)"], best["diffusers, bf16 weights"]
    rows = [f"| {name} | {spent:.1f} s | {base / spent:.2f} | {half / spent:.2f} |" for name, spent in best.items()]
    return "\n".join([
        f"SD 1.5-shaped model (random weights, seed 0), {args.size}², {args.steps} steps, guidance 7.5, "
        f"its own scheduler, prompt to PNG file; best of {args.rounds} interleaved rounds.",
        "",
        "| run | seconds per image | speed vs diffusers fp32 | speed vs diffusers bf16 |",
        "|---|---|---|---|",
        *rows,
    ])  # fmt: skip


def sdxl_table(args: argparse.Namespace) -> str:
    """One guided step (batch 2) of the SDXL-shaped UNet: ours at its defaults, diffusers fp32 and bf16."""
    from diffusers import UNet2DConditionModel

    from ldm.unet import UNet

    config = unet_config("sdxl", args.reduced)
    device = pick_device("auto")
    dtype = pick_dtype("auto", device)
    torch.manual_seed(0)
    ours = UNet(config).eval()
    unets = {"ours": ours.to(dtype)}
    for name, kind in (("diffusers fp32", torch.float32), ("diffusers bf16", torch.bfloat16)):
        theirs = UNet2DConditionModel(**config.to_diffusers()).eval()
        theirs.load_state_dict(ours.state_dict())
        unets[name] = theirs.to(device, kind)
    unets["ours"].to(device)
    side = args.sdxl_size // 8

    def step(name: str) -> Callable[[], None]:
        kind = next(unets[name].parameters()).dtype
        x = torch.randn(2, 4, side, side, device=device, dtype=kind)
        text = torch.randn(2, 77, config.cross_attention_dim, device=device, dtype=kind)
        pooled = torch.randn(2, 1280, device=device, dtype=kind)
        ids = torch.tensor([[args.sdxl_size, args.sdxl_size, 0, 0, args.sdxl_size, args.sdxl_size]] * 2).to(x)
        if name == "ours":
            return lambda: unets[name](x, 500, text, pooled, ids)
        return lambda: unets[name](x, 500, text, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})

    calls = {name: step(name) for name in unets}
    with torch.inference_mode():
        for call in calls.values():
            call()  # warm-up
        best = best_of(args.rounds, calls)
    parameters = sum(p.numel() for p in ours.parameters())
    width = "a quarter of the channels (80, 160, 320)" if args.reduced else "full width"
    rows = [
        f"| {name} | {spent:.2f} s | {best['diffusers fp32'] / spent:.2f} | {best['diffusers bf16'] / spent:.2f} |"
        for name, spent in best.items()
    ]
    return "\n".join([
        f"SDXL-shaped UNet, {width} ({parameters:,} parameters), random weights, {args.sdxl_size}², one guided "
        f"step (batch 2); ours at `--dtype auto` ({dtype_name(dtype)}); best of {args.rounds} "
        "interleaved rounds.",
        "",
        "| run | seconds per step | speed vs diffusers fp32 | speed vs diffusers bf16 |",
        "|---|---|---|---|",
        *rows,
    ])  # fmt: skip


# The process's own peak (VmHWM), printed as it exits: the peak a parent reads with getrusage also
# counts the parent's memory at the moment it forked.
PEAK = """import atexit, sys
def _peak():
    kb = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print("peak-kB", kb, file=sys.stderr)
atexit.register(_peak)
"""
SAMPLE_JOB = """import runpy, sys
sys.argv = ["sample.py", *sys.argv[1:]]
runpy.run_path("sample.py", run_name="__main__")
"""


def peak_memory(code: str, arguments: list[str]) -> float:
    """The peak resident memory, in GB, of a fresh Python process running `code` with `arguments`."""
    done = subprocess.run([sys.executable, "-c", PEAK + code, *arguments], cwd=ROOT, capture_output=True, text=True)
    found = re.search(r"peak-kB (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{code.strip().splitlines()[-1]} failed:\n{done.stderr[-2000:]}")
    return int(found.group(1)) * 1024 / 1e9


DIFFUSERS_JOB = """
import sys, torch
from diffusers import StableDiffusionPipeline
folder, size, steps, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4])
pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None)
image = pipe({prompt!r}, num_inference_steps=steps, height=size, width=size, generator=torch.Generator().manual_seed(0))
image.images[0].save(sys.argv[5])
"""

LOAD_JOB = """
import sys, torch
from ldm.single_file import load_single_file
model = load_single_file(sys.argv[1])
with torch.no_grad():  # every weight read once: resident, not only mapped from the file
    print(sum(float(p.sum()) for part in model.parts().values() for p in part.parameters()))
"""


def memory_table(folder: Path, args: argparse.Namespace) -> str:
    out = Path(tempfile.mkdtemp())
    job, size, steps = DIFFUSERS_JOB.format(prompt=PROMPT), str(args.size), str(args.memory_steps)
    ours = ["--model", str(folder), "--prompt", PROMPT, "--seed", "0", "--steps", steps, "--height", size,
            "--width", size]  # fmt: skip
    jobs = {
        "sample.py, its defaults (`--dtype auto`)": (SAMPLE_JOB, [*ours, "--outdir", str(out / "auto")]),
        "sample.py `--dtype fp32`": (SAMPLE_JOB, [*ours, "--dtype", "fp32", "--outdir", str(out / "fp32")]),
        "diffusers, its defaults (fp32)": (job, [str(folder), size, steps, "float32", str(out / "a.png")]),
        "diffusers, bf16 weights": (job, [str(folder), size, steps, "bfloat16", str(out / "b.png")]),
    }
    rows = [f"| {name} | {peak_memory(code, arguments):.2f} GB |" for name, (code, arguments) in jobs.items()]
    lines = [
        f"Peak resident memory of one process: the SD 1.5-shaped model, {args.size}², {args.memory_steps} steps "
        "(more steps need no more memory), from start to PNG file.",
        "",
        "| job | peak memory |",
        "|---|---|",
        *rows,
    ]
    sdxl_file = sdxl_single_file(Path(args.cache) / "sdxl-fp16.safetensors")
    peak, size_gb = peak_memory(LOAD_JOB, [str(sdxl_file)]), sdxl_file.stat().st_size / 1e9
    lines += [
        "",
        f"Loading the SDXL preset's single file in fp16 ({size_gb:.2f} GB, random weights) and reading every weight "
        f"once: peak {peak:.2f} GB, "
        f"{peak / size_gb:.2f}x the file's size.",
    ]
    return "\n".join(lines)


def sdxl_single_file(path: Path) -> Path:
    """The SDXL preset, random fp16 weights, written once as an original-layout single file."""
    if not path.is_file():
        from ldm.single_file import save_single_file

        with torch.device("meta"):
            model = LatentDiffusion.from_preset("sdxl")
        for part in model.parts().values():
            part.to_empty(device="cpu").to(torch.float16)
            with torch.no_grad():
                for tensor in part.state_dict().values():
                    tensor.normal_(0, 0.02)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_single_file(model, path)
    return path


def write_into(markdown: Path, table: str, block: str) -> None:
    """Put the table's block between its markers, under HEADING (both made the first time): a run
    of one table leaves the others as they were."""
    begin, end = f"<!-- bench.py {table}: begin -->", f"<!-- bench.py {table}: end -->"
    text = markdown.read_text()
    if HEADING not in text:
        text = text.rstrip() + f"\n\n{HEADING}\n"
    block = f"{begin}\n{block}\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    markdown.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["pipeline", "sdxl", "memory"], action="append", help="default: all")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sdxl-size", type=int, default=1024)
    parser.add_argument("--reduced", action="store_true", help="the SDXL UNet at a quarter of its channels")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "ldm-bench"), help="the models made")
    parser.add_argument("--write", action="store_true", help="put the tables into BENCHMARKS.md")
    args = parser.parse_args()
    quiet_libraries()  # diffusers warns at every cast of its weights
    tables = args.only or ["pipeline", "sdxl", "memory"]
    command = ("python scripts/bench.py " + " ".join(sys.argv[1:])).strip()
    stamp = f"{time.strftime('%Y-%m-%d')}, `{command}`, {machine()}"
    folder = sd15_folder(Path(args.cache) / "sd15")
    for table in tables:
        print(f"running the {table} table", file=sys.stderr)
        made = {
            "pipeline": lambda: pipeline_table(folder, args),
            "sdxl": lambda: sdxl_table(args),
            "memory": lambda: memory_table(folder, args),
        }[table]()
        block = f"### {TITLES[table]}\n\n{stamp}.\n\n{made}"
        print(block + "\n")
        if args.write:
            write_into(ROOT / "BENCHMARKS.md", table, block)


if __name__ == "__main__":
    main()
