"""One error family: every mistake a user can make is a UserError, which each command line turns
into one line and exit code 2; a command catches that type alone."""

import ast
from pathlib import Path

import pytest

from commands.cli import UsageError
from ldm.data.datasets import DatasetError
from ldm.errors import ConfigError, UserError
from ldm.model import ModelLoadError
from pipelines.devices import DeviceError
from pipelines.infotext import InfotextError
from pipelines.prompts import PromptError
from pipelines.samplers import UnknownScheduler
from pipelines.settings import GenerationError

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["sample.py", "train.py", "commands/describe.py", "commands/make_shapes.py",
            "commands/eval_shapes.py", "commands/eval_additivity.py", "commands/eval_metrics.py",
            "commands/convert.py"]  # fmt: skip


@pytest.mark.parametrize(
    "error",
    [ConfigError, ModelLoadError, DatasetError, UsageError, DeviceError, InfotextError, PromptError,
     UnknownScheduler, GenerationError],
)  # fmt: skip
def test_every_user_facing_error_is_a_user_error(error):
    assert issubclass(error, UserError)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_line_exits_2_on_user_error_alone(command):
    """The handlers in `main` that print one line and exit 2 (`fail`) catch `UserError` and nothing else."""
    tree = ast.parse((ROOT / command).read_text())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    exits_2 = [
        ast.unparse(handler.type)
        for handler in ast.walk(main)
        if isinstance(handler, ast.ExceptHandler)
        and ("return 2" in ast.unparse(handler) or "fail(" in ast.unparse(handler))
    ]
    assert exits_2 == ["UserError"]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


@pytest.mark.parametrize(
    "layer, above",
    [("ldm", ("pipelines", "server", "commands")), ("pipelines", ("server", "commands")), ("server", ("commands",))],
)
def test_dependencies_point_one_way(layer, above):
    """commands -> pipelines -> ldm: the library never imports the layers above it, anywhere in a file."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] in above)
        for path in (ROOT / layer).rglob("*.py")
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}
