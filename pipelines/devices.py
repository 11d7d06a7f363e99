"""Where and in what precision a pipeline runs: CUDA in half precision when present, then MPS, then CPU."""

import torch

from ldm.errors import UserError
from ldm.model import DTYPES


class DeviceError(UserError):
    pass


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA, else Apple's MPS, else the CPU; a named device must be present."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, present in available.items() if present))
    if name not in available:
        raise DeviceError(f"device={name!r}: use one of auto, cuda, mps, cpu")
    if not available[name]:
        raise DeviceError(f"device={name!r} is not available on this machine")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs that have it (no fp16 overflow in attention), fp16 on other GPUs and MPS,
    fp32 on the CPU (where half precision is slower, not faster)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"dtype={name!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
