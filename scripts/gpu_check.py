"""What a lent GPU shows in one run of at most about 8 minutes, printed as a Markdown table for
BENCHMARKS.md: images beside diffusers in fp16 and bf16, SD 1.5 and SDXL denoising speed and memory
beside diffusers (SDPA, channels-last, torch.compile), and the memory of training steps.

    python scripts/gpu_check.py            # on a CUDA GPU: SD 1.5 at 512², SDXL at 1024², random weights
    python scripts/gpu_check.py --smoke    # the same code on the CPU with the tiny presets (in the test suite)

The weights are random (no model can be downloaded where this is written), the same for ours and
diffusers; images are compared pixel by pixel. In --smoke, torch.compile uses its eager backend: the
graph capture runs, the code generation does not (minutes on a CPU), and the figures mean nothing.
"""

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from commands.cli import quiet_libraries  # noqa: E402
from ldm.model import LatentDiffusion, dtype_name  # noqa: E402
from ldm.unet import UNet  # noqa: E402
from pipelines.devices import describe_device  # noqa: E402
from pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from scripts.bench_finetune import build, step  # noqa: E402
from scripts.benchlib import unet_config  # noqa: E402


class Sizes(NamedTuple):
    sd: str  # the SD 1.5-shaped preset
    sdxl: str
    sd_size: int  # image side, pixels
    sdxl_size: int
    steps: int  # sampling steps for the image comparison
    timed: int  # UNet calls per timing
    backend: str  # torch.compile's


FULL = Sizes("sd15", "sdxl", 512, 1024, 20, 20, "inductor")
SMOKE = Sizes("tiny", "sdxl-tiny", 16, 16, 2, 2, "eager")
PROMPT = "a photograph of an astronaut riding a horse"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gb(run: Callable[[], None]) -> float:
    """The GPU memory at the peak of `run`; on the CPU the process's resident peak so far."""
    if not torch.cuda.is_available():
        run()
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        return int(line.split()[1]) * 1024 / 2**30
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run()
    synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def seconds_per_call(call: Callable[[], object], calls: int) -> float:
    call()  # warm-up (and, compiled, the compilation)
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize()
    return (time.perf_counter() - start) / calls


def images_beside_diffusers(folder: Path, sizes: Sizes, device: str) -> list[str]:
    """Our pipeline and diffusers' on the same weights, seed and scheduler, in fp16 and bf16."""

    rows = []
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        ours = TextToImagePipeline.from_pretrained(folder, device=device, dtype=name)
        theirs = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None).to(device)
        theirs.set_progress_bar_config(disable=True)
        options = dict(height=sizes.sd_size, width=sizes.sd_size, guidance_scale=7.5)
        (a,) = ours(PROMPT, seed=0, steps=sizes.steps, progress=False, **options)
        generator = torch.Generator().manual_seed(0)
        b = theirs(PROMPT, num_inference_steps=sizes.steps, generator=generator, **options).images[0]
        difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        rows.append(f"| SD 1.5 image, {name}, ours vs diffusers | max {difference.max()}/255, "
                    f"mean {difference.mean():.2f}/255 |")  # fmt: skip
        del ours, theirs
    return rows


def inputs(config, size: int, device: str, dtype: torch.dtype) -> tuple:
    """One guided denoising step's inputs: batch 2 (unconditional and conditional), 77 tokens of text,
    and SDXL's pooled text and six size ids."""
    latents = torch.randn(2, 4, size // 8, size // 8, device=device, dtype=dtype)
    text = torch.randn(2, 77, config.cross_attention_dim, device=device, dtype=dtype)
    pooled = ids = None
    if config.addition_embed_type == "text_time":
        width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        pooled = torch.randn(2, width, device=device, dtype=dtype)
        ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=dtype)
    return latents, torch.tensor(500, device=device), text, pooled, ids


def caller(unet: torch.nn.Module, ours: bool, step_inputs: tuple) -> Callable[[], object]:
    """A no-grad call of our UNet or diffusers' (whose SDXL inputs go in added_cond_kwargs)."""
    latents, timestep, text, pooled, ids = step_inputs
    added = None if pooled is None else {"text_embeds": pooled, "time_ids": ids}

    def call():
        with torch.inference_mode():
            if ours:
                return unet(latents, timestep, text, pooled, ids)
            return unet(latents, timestep, text, added_cond_kwargs=added).sample

    return call


def speed_rows(preset: str, size: int, sizes: Sizes, device: str, dtype: torch.dtype, variants: bool) -> list[str]:
    """Denoising steps per second (guided, batch 1 image) and peak memory, ours beside diffusers on the
    same weights; with `variants`, channels-last and torch.compile too (compile time stated)."""
    torch.manual_seed(0)
    ours = UNet(unet_config(preset, False)).to(device, dtype).eval()
    theirs = UNet2DConditionModel(**ours.config.to_diffusers())
    theirs.load_state_dict(ours.state_dict())
    theirs.to(device, dtype).eval()
    step_inputs = inputs(ours.config, size, device, dtype)
    label = f"{'SD 1.5' if preset == sizes.sd else 'SDXL'} {size}², {dtype_name(dtype)}"
    rows, timed = [], {}
    for name, unet, is_ours in (("ours", ours, True), ("diffusers", theirs, False)):
        timed[name] = seconds_per_call(caller(unet, is_ours, step_inputs), sizes.timed)
        memory = peak_gb(caller(unet, is_ours, step_inputs))
        rows.append(f"| {label}, {name}, SDPA | {1 / timed[name]:.2f} it/s, peak {memory:.2f} GB |")
    if variants:
        for name, unet, is_ours in (("ours", ours, True), ("diffusers", theirs, False)):
            unet.to(memory_format=torch.channels_last)
            last = (step_inputs[0].to(memory_format=torch.channels_last), *step_inputs[1:])
            spent = seconds_per_call(caller(unet, is_ours, last), sizes.timed)
            rows.append(f"| {label}, {name}, channels-last | {1 / spent:.2f} it/s |")
            unet.to(memory_format=torch.contiguous_format)
            start = time.perf_counter()
            compiled = torch.compile(unet, backend=sizes.backend)
            caller(compiled, is_ours, step_inputs)()
            compile_time = time.perf_counter() - start
            timed[f"{name} compiled"] = spent = seconds_per_call(caller(compiled, is_ours, step_inputs), sizes.timed)
            rows.append(f"| {label}, {name}, torch.compile | {1 / spent:.2f} it/s (compiled in {compile_time:.0f} s) |")
        ratio = timed["diffusers compiled"] / timed["ours compiled"]
        rows.append(f"| {label}, ours / diffusers, both compiled | {ratio:.2f}x (goal: 1.2x) |")
    rows.append(f"| {label}, ours / diffusers, SDPA | {timed['diffusers'] / timed['ours']:.2f}x |")
    return rows


def training_rows(sizes: Sizes, device: str) -> list[str]:
    """A LoRA step on SDXL and a full fine-tuning step on SD 1.5: time and peak memory, bf16 autocast
    on the GPU, gradient checkpointing, AdamW (8-bit where bitsandbytes is installed), batch 1: the
    steps of scripts/bench_finetune.py."""
    return [
        training_row("SDXL LoRA (rank 16) step", unet_config(sizes.sdxl, False), "ours lora", sizes.sdxl_size, device),
        training_row("SD 1.5 full fine-tuning step", unet_config(sizes.sd, False), "ours full", sizes.sd_size, device),
    ]


def training_row(label: str, config, mode: str, size: int, device: str) -> str:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    unet, optimizer = build(mode, config, True, device)
    schedule = DDPMScheduler()

    def one() -> None:
        step(unet, optimizer, schedule, 1, size, device, dtype)

    spent, memory = seconds_per_call(one, 2), peak_gb(one)
    return f"| {label}, {size}², batch 1, {type(optimizer).__name__} | {spent:.2f} s, peak {memory:.2f} GB |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the CPU, the tiny presets: the code runs, that is all")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU here; --smoke runs the same code on the CPU", file=sys.stderr)
        return 2
    quiet_libraries()
    sizes, device = (SMOKE, "cpu") if args.smoke else (FULL, "cuda")
    half = torch.float16
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LatentDiffusion.from_preset(sizes.sd).save(Path(folder) / "sd")
        rows += images_beside_diffusers(Path(folder) / "sd", sizes, device)
    rows += speed_rows(sizes.sd, sizes.sd_size, sizes, device, half, variants=True)
    rows += speed_rows(sizes.sdxl, sizes.sdxl_size, sizes, device, half, variants=False)
    rows += training_rows(sizes, device)
    smoke = " (--smoke: the tiny presets on the CPU, so the figures mean nothing)" if args.smoke else ""
    print(f"{describe_device(torch.device(device), half)}; torch {torch.__version__}; "
          f"{time.perf_counter() - started:.0f} s in all{smoke}\n")  # fmt: skip
    print("| check | result |\n|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
