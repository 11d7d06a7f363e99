"""Fine-tuning speed and memory: full and LoRA training steps of the SD 1.5 (or SDXL) UNet
architecture with random weights, ours beside diffusers' own (UNet2DConditionModel, `add_adapter`
as its LoRA training script does), same weights, batch, precision and step, interleaved in one run.

    python scripts/bench_finetune.py                       # CUDA: SD 1.5 at 512², bf16, 8-bit AdamW
    python scripts/bench_finetune.py --reduced --size 256  # CPU: SD 1.5's shape at a quarter of the width
    python scripts/bench_finetune.py --model sdxl --size 1024   # CUDA: SDXL (pooled text, size ids too)

Prints images per second per mode; peak memory is measured per mode in a fresh process (CUDA:
max_memory_allocated; CPU: the process's peak resident set, imports included). Not a test:
figures go to BENCHMARKS.md.
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.unet import UNet, UNetConfig  # noqa: E402
from scripts.benchlib import unet_config  # noqa: E402

MODES = ["ours full", "diffusers full", "ours lora", "diffusers lora"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build(mode: str, config: UNetConfig, checkpointing: bool, device: str):
    torch.manual_seed(0)
    ours = UNet(config)
    if mode.startswith("ours"):
        unet = ours
        unet.gradient_checkpointing = checkpointing
    else:
        unet = UNet2DConditionModel(**config.to_diffusers())
        unet.load_state_dict(ours.state_dict())
        if checkpointing:
            unet.enable_gradient_checkpointing()
    if mode.endswith("lora"):
        unet.requires_grad_(False)
        adapter = LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights="gaussian")
        if mode.startswith("ours"):
            inject_adapter_in_model(adapter, unet)
        else:
            unet.add_adapter(adapter)  # diffusers' PeftAdapterMixin, as train_text_to_image_lora.py
    unet.to(device).train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    return unet, make_optimizer(trainable, device)


def make_optimizer(parameters: list[torch.nn.Parameter], device: str) -> torch.optim.Optimizer:
    """8-bit AdamW on CUDA where bitsandbytes is installed (as `optim.use_8bit_adam`), else AdamW."""
    if device == "cuda" and importlib.util.find_spec("bitsandbytes"):
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, lr=1e-4)
    return torch.optim.AdamW(parameters, lr=1e-4)


def step(unet, optimizer, schedule, batch: int, size: int, device: str, dtype: torch.dtype) -> None:
    config: UNetConfig = unet.config if isinstance(unet, UNet) else UNetConfig.from_diffusers(dict(unet.config))
    latents = torch.randn(batch, 4, size // 8, size // 8, device=device)
    text = torch.randn(batch, 77, config.cross_attention_dim, device=device)
    added = {}
    if config.addition_embed_type == "text_time":  # SDXL: the pooled text and six size ids
        width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, width, device=device),
                 "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device)}  # fmt: skip
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
        noisy = schedule.add_noise(latents, noise, timesteps)
        if isinstance(unet, UNet):
            prediction = unet(noisy, timesteps, text, added.get("text_embeds"), added.get("time_ids"))
        else:
            prediction = unet(noisy, timesteps, text, added_cond_kwargs=added or None).sample
        loss = F.mse_loss(prediction.float(), noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def high_water_mark() -> int:
    """This process's peak resident set, in bytes: VmHWM, which (unlike getrusage's ru_maxrss)
    does not carry the parent's peak across exec."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def peak_memory(args, mode: str) -> float:
    """GB at the peak of a few steps of `mode`, in a fresh process."""
    command = [sys.executable, __file__, "--only", mode, *sys.argv[1:]]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)["peak_gb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15", help="the UNet's preset")
    parser.add_argument("--reduced", action="store_true", help="a quarter of the channels")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latents: size/8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # one mode's peak memory, for the parent
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config, schedule = unet_config(args.model, args.reduced), DDPMScheduler()
    if args.only:
        unet, optimizer = build(args.only, config, not args.no_checkpointing, device)
        for _ in range(3):
            step(unet, optimizer, schedule, args.batch, args.size, device, dtype)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else high_water_mark()
        print(json.dumps({"peak_gb": peak / 2**30}))
        return
    built = {mode: build(mode, config, not args.no_checkpointing, device) for mode in MODES}
    for unet, optimizer in built.values():
        step(unet, optimizer, schedule, args.batch, args.size, device, dtype)  # warm-up
    times = {mode: [] for mode in MODES}
    for _ in range(args.rounds):  # interleaved, so a slow minute on the machine hits every mode
        for mode, (unet, optimizer) in built.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(unet, optimizer, schedule, args.batch, args.size, device, dtype)
            if device == "cuda":
                torch.cuda.synchronize()
            times[mode].append((time.perf_counter() - start) / args.steps)
    optimizer_name = type(built[MODES[0]][1]).__name__
    del built
    name = {"sd15": "SD 1.5", "sdxl": "SDXL"}[args.model] + (", a quarter of the channels" if args.reduced else "")
    print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, UNet {name}, "
          f"{args.size}², batch {args.batch}, checkpointing {not args.no_checkpointing}, {optimizer_name}")  # fmt: skip
    for mode in MODES:
        best = min(times[mode])
        print(f"{mode:15s} {best:7.3f} s/step  {args.batch / best:6.2f} images/s  "
              f"peak {peak_memory(args, mode):5.2f} GB")  # fmt: skip
    for kind in ("full", "lora"):
        ratio = min(times[f"ours {kind}"]) / min(times[f"diffusers {kind}"])
        print(f"{kind}: ours / diffusers step time {ratio:.2f}")


if __name__ == "__main__":
    main()
