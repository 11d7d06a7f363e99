"""SDXL denoising speed: one guided UNet step (batch 2: unconditional and conditional) of the SDXL
base UNet with random weights, ours beside diffusers' UNet2DConditionModel on the same weights,
pooled text and time ids, interleaved in one run.

    python scripts/bench_sdxl.py                          # CUDA: the SDXL UNet at 1024², bf16
    python scripts/bench_sdxl.py --reduced --size 256     # CPU: SDXL's blocks at a quarter of the width

Prints seconds per step for each and their ratio. Not a test: figures go to BENCHMARKS.md.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.unet import UNet  # noqa: E402
from scripts.benchlib import unet_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="a quarter of the channels (for a CPU)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (latents: 1/8)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = unet_config("sdxl", args.reduced)
    torch.manual_seed(0)
    ours = UNet(config)
    theirs = UNet2DConditionModel(**config.to_diffusers())
    theirs.load_state_dict(ours.state_dict())
    unets = {"ours": ours.to(device, dtype).eval(), "diffusers": theirs.to(device, dtype).eval()}
    side = args.size // 8
    latents = torch.randn(2, 4, side, side, device=device, dtype=dtype)
    text = torch.randn(2, 77, config.cross_attention_dim, device=device, dtype=dtype)
    pooled = torch.randn(2, 1280, device=device, dtype=dtype)
    ids = torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * 2, device=device, dtype=dtype)
    calls = {
        "ours": lambda: unets["ours"](latents, 500, text, pooled, ids),
        "diffusers": lambda: (
            unets["diffusers"](latents, 500, text, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():
            call()  # warm-up
        for _ in range(args.rounds):
            for name, call in calls.items():  # interleaved: a slow spell hits both
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.steps):
                    call()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) / args.steps)
    count = sum(p.numel() for p in ours.parameters())
    print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, SDXL UNet {count:,} parameters"
          f"{' (a quarter of the channels)' if args.reduced else ''}, {args.size}², batch 2")  # fmt: skip
    for name, values in times.items():
        print(f"{name:10s} {min(values):7.3f} s/step")
    print(f"ours / diffusers step time {min(times['ours']) / min(times['diffusers']):.2f}")


if __name__ == "__main__":
    main()
