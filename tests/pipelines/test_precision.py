"""`--dtype auto` on the CPU: bf16 weights where the CPU has bf16 instructions (AMX or AVX512-BF16),
fp32 elsewhere. The bf16 path runs on any CPU (emulated where not native, only slower), so it is
tested everywhere by telling the pipeline the CPU has the instructions."""

import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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


def _draw(folder: Path, *argv) -> int:
    import sample

    return sample.main(["--steps", "2", "--device", "cpu", "--outdir", str(folder), *map(str, argv)])


def _pixels_and_dtype(path: Path) -> tuple[np.ndarray, str]:
    with Image.open(path) as image:
        return np.asarray(image), image.text["dtype"]


def test_from_png_draws_in_the_precision_the_png_records(tiny_model_dir, tmp_path, monkeypatch, recwarn):
    """Issue 42: drawn with `--dtype auto` on a bf16 CPU, the PNG was redrawn in fp32 on a CPU
    without bf16 instructions: another picture. The precision is recorded and --from-png uses it
    (with a warning where it is emulated) unless --dtype says otherwise."""
    monkeypatch.setattr(devices, "native_bf16", lambda: "amx_bf16")  # the machine that drew it
    model = ["--model", tiny_model_dir, "--prompt", "a red circle", "--seed", "4"]
    assert _draw(tmp_path / "bf16", *model) == 0
    first = tmp_path / "bf16" / "00000-4.png"
    pixels, dtype = _pixels_and_dtype(first)
    assert dtype == "bf16" and '"dtype": "bf16"' in (tmp_path / "bf16" / "manifest.jsonl").read_text()

    monkeypatch.setattr(devices, "native_bf16", lambda: None)  # another machine: auto would be fp32
    assert _draw(tmp_path / "again", "--models-dir", tiny_model_dir.parent, "--from-png", first) == 0
    assert [str(w.message) for w in recwarn] == [
        f"--from-png {first} was drawn in bf16, which this cpu has no instructions for: drawing in bf16 all the "
        "same, emulated (slower, and the picture may differ slightly); --dtype chooses another"
    ]
    again, dtype = _pixels_and_dtype(tmp_path / "again" / "00000-4.png")
    assert dtype == "bf16" and np.array_equal(again, pixels)
    assert _draw(tmp_path / "fp32", "--models-dir", tiny_model_dir.parent, "--from-png", first, "--dtype", "fp32") == 0
    assert _pixels_and_dtype(tmp_path / "fp32" / "00000-4.png")[1] == "fp32"  # --dtype wins


def test_skip_existing_finishes_a_folder_in_the_precision_it_was_begun_in(tiny_model_dir, tmp_path, monkeypatch):
    """A run begun in bf16 and finished on a machine whose auto is fp32 does not mix the two."""
    run = ["--model", tiny_model_dir, "--prompt", "a red circle", "--seed", "4", "--num-images", "3"]
    assert _draw(tmp_path / "whole", *run, "--dtype", "bf16") == 0
    from pipelines.outputs import RunWriter

    write = RunWriter.write

    def killed_after_one(self, generated, job):
        if self.written == 1:
            raise KeyboardInterrupt
        return write(self, generated, job)

    monkeypatch.setattr(RunWriter, "write", killed_after_one)
    assert _draw(tmp_path / "part", *run, "--dtype", "bf16") == 130
    monkeypatch.setattr(RunWriter, "write", write)
    with pytest.warns(UserWarning, match=f"--skip-existing {tmp_path / 'part'} was drawn in bf16"):
        assert _draw(tmp_path / "part", *run, "--skip-existing") == 0  # auto here: fp32
    for k in range(3):
        name = f"0000{k}-{4 + k}.png"
        assert _pixels_and_dtype(tmp_path / "part" / name)[1] == "bf16"
        assert np.array_equal(
            _pixels_and_dtype(tmp_path / "part" / name)[0], _pixels_and_dtype(tmp_path / "whole" / name)[0]
        )


def test_the_precisions_a_png_may_record_are_the_ones_the_model_loads_in():
    """pipelines/choices.py names them without torch (sample.py reads a PNG before torch loads)."""
    from ldm.model import DTYPES
    from pipelines.choices import PRECISIONS

    assert PRECISIONS == tuple(DTYPES)
