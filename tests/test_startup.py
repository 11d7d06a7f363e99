"""sample.py and train.py starting: Ctrl-C while the libraries load is one line and exit 130; --help and usage
errors answer without loading them (real processes)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ctrl_c_while_sample_py_starts_is_one_line_and_130(tmp_path):
    run = subprocess.Popen([sys.executable, "sample.py", "--prompt", "x", "--outdir", str(tmp_path / "out")],
                           cwd=ROOT, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(2)  # inside the imports (5 s on 2 cores), or on a busy machine a little later: one line either way
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130
    err = run.stderr.read()
    assert err.startswith("sample.py: interrupted") and err.endswith("nothing written\n") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "script, argv",
    [("sample.py", ["--help"]), ("sample.py", ["--steps", "x"]), ("sample.py", ["--prompt", "x", "--seed", "-5"]),
     ("train.py", ["--help"]), ("train.py", [])],
)  # fmt: skip
def test_help_and_usage_errors_answer_without_loading_torch(script, argv):
    """sample.py --help took 4.9 s on a quiet 2-core machine, nearly all of it importing torch,
    diffusers and transformers; it needs none of them."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, *{argv!r}]\n"
        f"try:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print(code, sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] in ("0 []", "2 []"), done.stderr
