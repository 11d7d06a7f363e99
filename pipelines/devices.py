"""Where and in what precision a pipeline runs: CUDA in half precision when present, then MPS, then
CPU; a model's parts put there, and in eval mode while generating."""

import contextlib
import os
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ldm.errors import UserError
from ldm.model import DTYPES, LatentDiffusion, dtype_name

if TYPE_CHECKING:
    from accelerate import PartialState


class DeviceError(UserError):
    pass


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA, else Apple's MPS, else the CPU; a named device (`cuda:1` names one GPU of
    several) must be present."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, present in available.items() if present))
    kind, _, index = name.partition(":")
    if kind not in available or index and not (kind == "cuda" and index.isdigit()):
        raise DeviceError(f"device={name!r}: use one of auto, cuda, cuda:N, mps, cpu")
    if not available[kind] or index and int(index) >= torch.cuda.device_count():
        raise DeviceError(f"device={name!r} is not available on this machine")
    return torch.device(name)


def start_processes(name: str = "auto") -> tuple["PartialState", torch.device]:
    """This process's place among those a launcher started (`accelerate launch`, torchrun; one process
    alone otherwise), and its device: one GPU per process, or the CPU, where processes talk over gloo."""
    from accelerate import PartialState

    device = pick_device(name)
    state = PartialState(cpu=device.type == "cpu")
    return state, state.device if device.type == "cuda" else device


def memory_of(device: torch.device) -> int:
    """Bytes the device holds in all: the GPU's memory, or the machine's for the CPU (and MPS, which
    shares it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def native_bf16() -> str | None:
    """The instructions by which this CPU computes in bf16 (`amx_bf16`, else `avx512_bf16`), or None.
    Read from cpuinfo through torch, the library oneDNN's own dispatch follows."""
    flags = torch._C._cpu._get_cpu_capability()
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flags.get(flag)), None)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs that have it (no fp16 overflow in attention), fp16 on other GPUs and MPS;
    on the CPU bf16 where it has bf16 instructions (a UNet step 1.7x faster with AVX512-BF16, more with
    AMX: BENCHMARKS.md), else fp32 (emulated half precision is slower, not faster)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if native_bf16() else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"dtype={name!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def native(name: str, device: torch.device) -> bool:
    """Whether the device computes in the precision `name` with instructions of its own; else it is
    emulated: slower, and rounded otherwise than where it is native."""
    if device.type == "cpu" and name in ("bf16", "fp16"):
        return name == "bf16" and native_bf16() is not None
    if device.type == "cuda" and name == "bf16":
        return torch.cuda.is_bf16_supported()
    return True


def describe_device(device: torch.device, dtype: torch.dtype) -> str:
    """One line on where a run computes and why in that precision: what `sample.py` prints first."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        flags = torch._C._cpu._get_cpu_capability()
        bf16 = native_bf16() or "no bf16 instructions"
        where = f"{flags.get('cpu_name') or 'CPU'}, {torch.get_num_threads()} threads, {bf16}"
    else:
        where = device.type
    return f"{device.type} ({where}): {dtype_name(dtype)} weights"


def on_device(model: LatentDiffusion, device: torch.device, dtype: torch.dtype, copy: bool) -> LatentDiffusion:
    """The model with every part on `device` in `dtype` (channels-last UNet on CUDA). Parts already
    so are shared; others are copied first when `copy` (a model we were handed stays as it was)."""
    parts = {}
    for name, part in model.parts().items():
        weight = next(part.parameters())
        # SDXL's VAE overflows in fp16: it decodes in fp32 unless its config says it need not (an fp16-fixed VAE)
        upcast = name == "vae" and model.is_sdxl and dtype == torch.float16 and part.config.force_upcast
        part_dtype = torch.float32 if upcast else dtype
        channels_last = (  # faster convolutions on tensor cores; a UNet already so needs no copy
            name == "unet"
            and device.type == "cuda"
            and not part.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        )
        if weight.dtype == part_dtype and weight.device == device and not channels_last:
            continue
        part = deepcopy(part) if copy else part
        if weight.dtype != part_dtype:  # diffusers warns on any dtype cast, even a no-op
            part.to(dtype=part_dtype)
        part.to(device)
        parts[name] = part.to(memory_format=torch.channels_last) if channels_last else part
    return replace(model, **parts)


@contextlib.contextmanager
def evaluating(model: LatentDiffusion, vae_tiling: bool) -> Iterator[None]:
    """Every part in eval mode while generating, the VAE sliced (a batch decoded one image at a time,
    so decoding memory does not grow with the batch: 1024² SDXL images need it) and tiled if asked;
    as they were after."""
    modes = {name: part.training for name, part in model.parts().items()}
    tiling, slicing = model.vae.use_tiling, model.vae.use_slicing
    for part in model.parts().values():
        part.eval()
    model.vae.enable_slicing()
    if vae_tiling:
        model.vae.enable_tiling()
    try:
        yield
    finally:
        for name, part in model.parts().items():
            part.train(modes[name])
        model.vae.use_tiling, model.vae.use_slicing = tiling, slicing
