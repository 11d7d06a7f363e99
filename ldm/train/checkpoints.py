"""Training checkpoints: the full state (models, EMA, optimizer, LR schedule, RNG states, step)
written by Accelerate under a temporary name and renamed when complete, the last K kept."""

import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from ldm.errors import ConfigError
from ldm.files import DiskFull, is_disk_full

_STEP = re.compile(r"^step-(\d{8})$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, keep: int) -> Path:
    """Every process writes its part (its RNG state); the main process then renames and prunes.
    A run killed mid-save leaves only a `.partial` folder, which `latest` never picks."""
    folder = checkpoints_dir(output_dir)
    final, partial = folder / f"step-{step:08d}", folder / f".step-{step:08d}.partial"
    try:
        accelerator.save_state(str(partial))
    except Exception as error:
        if not is_disk_full(error):
            raise
        shutil.rmtree(partial, ignore_errors=True)
        raise DiskFull(f"{final}: no space left on the device; the earlier checkpoints are kept") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in completed(folder)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def remove_partial_checkpoints(output_dir: str | Path) -> None:
    """A run killed while saving leaves a `.step-N.partial` folder; the next start removes it (only one
    run writes into an output_dir)."""
    for partial in checkpoints_dir(output_dir).glob(".step-*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def completed(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _STEP.match(p.name))


def find_checkpoint(output_dir: str | Path, resume: str) -> Path:
    """`latest`: the newest finished checkpoint of this run; otherwise a checkpoint folder."""
    if resume == "latest":
        found = completed(checkpoints_dir(output_dir))
        if not found:
            raise ConfigError(f"checkpoint.resume=latest: no checkpoint in {checkpoints_dir(output_dir)}")
        return found[-1]
    path = Path(resume)
    if not _STEP.match(path.name) or not path.is_dir():
        raise ConfigError(f"checkpoint.resume={resume!r}: not a checkpoint folder (…/checkpoints/step-NNNNNNNN)")
    return path


def step_of(checkpoint: Path) -> int:
    return int(_STEP.match(checkpoint.name).group(1))
