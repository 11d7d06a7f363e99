"""A plain (non-editable) `pip install .` carries what the library needs: the presets and the tokenizer."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_non_editable_install_has_the_presets_and_the_tokenizer(tmp_path):
    source, target = tmp_path / "source", tmp_path / "site"  # a clean copy: no stale build/ folder to borrow from
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for package in ("ldm", "pipelines"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
               str(target), str(source)]  # fmt: skip
    subprocess.run(install, check=True, capture_output=True)
    script = (
        "import ldm, ldm.model; "
        "model = ldm.model.LatentDiffusion.from_preset('small'); "
        "print(ldm.__file__, len(model.tokenizer), sorted(p.stem for p in ldm.model.PRESET_DIR.glob('*.yaml')))"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    )
    where, vocabulary, presets = out.stdout.split(" ", 2)
    assert where.startswith(str(target))  # the installed copy, not this checkout
    names = "['sd15', 'sd21', 'sdxl', 'sdxl-refiner', 'sdxl-refiner-tiny', 'sdxl-tiny', 'small', 'tiny']"
    assert (vocabulary, presets.strip()) == ("49408", names)
