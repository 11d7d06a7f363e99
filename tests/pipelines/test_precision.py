"""`--dtype auto` on the CPU: bf16 weights where the CPU has bf16 instructions (AMX or AVX512-BF16),
fp32 elsewhere. The bf16 path runs on any CPU (emulated where not native, only slower), so it is
tested everywhere by telling the pipeline the CPU has the instructions."""

import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import devices
from pipelines.devices import describe_device, native_bf16, pick_dtype
from pipelines.text_to_image import TextToImagePipeline

CPU = torch.device("cpu")


def test_bf16_instructions_are_read_from_the_cpus_own_flags():
    """torch's cpuinfo agrees with the kernel's list of the CPU's flags."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.system() != "Linux" or not cpuinfo.is_file():
        pytest.skip("the kernel's flag list is Linux's /proc/cpuinfo")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    expected = "amx_bf16" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None
    assert native_bf16() == expected


@pytest.mark.parametrize("instructions", ["amx_bf16", "avx512_bf16", None])
def test_auto_takes_bf16_on_a_cpu_with_bf16_instructions_and_fp32_on_others(monkeypatch, instructions):
    monkeypatch.setattr(devices, "native_bf16", lambda: instructions)
    assert pick_dtype("auto", CPU) == (torch.bfloat16 if instructions else torch.float32)
    assert pick_dtype("fp32", CPU) == torch.float32  # asked for by name: as asked, on any CPU
    line = describe_device(CPU, pick_dtype("auto", CPU))
    assert line.endswith("bf16 weights" if instructions else "fp32 weights")
    assert (instructions or "no bf16 instructions") in line and "threads" in line


def test_auto_on_a_bf16_cpu_runs_every_part_in_bf16_close_to_fp32(tiny_model_dir, monkeypatch):
    """UNet, text encoder and VAE in bf16: the demo model's VAE decodes within 2/255 of fp32 in bf16
    (docs/performance.md), so it need not stay in fp32."""
    monkeypatch.setattr(devices, "native_bf16", lambda: "avx512_bf16")
    fast = TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu")
    full = TextToImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    assert {name: next(part.parameters()).dtype for name, part in fast.model.parts().items()} == {
        "unet": torch.bfloat16, "vae": torch.bfloat16, "text_encoder": torch.bfloat16
    }  # fmt: skip
    options = dict(steps=3, seed=0, scheduler="ddim", progress=False)
    (a,), (b,) = fast("a red circle", **options), full("a red circle", **options)
    assert np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean() < 8


def test_sample_says_first_where_it_runs_and_in_what_precision(tiny_model_dir, tmp_path, capsys):
    import sample

    assert sample.main(["--prompt", "a red circle", "--model", str(tiny_model_dir), "--steps", "1",
                        "--outdir", str(tmp_path / "out")]) == 0  # fmt: skip
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("sample.py: cpu (") and first.endswith("fp32 weights")  # the suite's CPU has no bf16
