"""The two rules of the house: the model library never imports the service, and nothing an HTTP front-end
imports pulls in torch (that one: ``tests/test_processes.py::test_frontends_and_the_supervisor_start_without_torch``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Absolute module names that ``path`` imports, at any depth of its code (function-local imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_models_never_import_service() -> None:
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in imported_modules(p) if n == "service" or n.startswith("service."))
                 for p in sorted((ROOT / "models").rglob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}
    assert len(offenders) > 40  # the walk saw the whole library


def test_the_model_commands_run_without_the_service() -> None:
    """``python -m models.cli`` (train, evaluate, calibrate, …) loads no module of ``service``."""
    code = "import sys, runpy; sys.argv = ['models.cli', '--help']\ntry:\n    runpy.run_module('models.cli', run_name='__main__')\n" \
           "except SystemExit:\n    pass\nprint(sorted(m for m in sys.modules if m == 'service' or m.startswith('service.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip().splitlines()[-1] == "[]"


# Which rooms of service/ each room may import (besides itself, the leaves and the model library).
SERVICE_ROOMS = {
    "frontend": {"core", "ipc"},
    "executor": {"core", "ipc"},
    "core": set(),
    "ipc": set(),
}
LEAVES = {"service.settings", "service.errors", "service.metrics", "service.heap"}


def test_service_rooms_import_only_downwards() -> None:
    """A front-end and an executor share only the core, the IPC modules and the leaves; the core and the IPC modules
    import no process's room (so neither process can reach into the other's)."""
    offenders = {}
    for room, allowed in SERVICE_ROOMS.items():
        for path in sorted((ROOT / "service" / room).rglob("*.py")):
            bad = sorted(n for n in imported_modules(path) if n.startswith("service.") and n not in LEAVES
                         and n.split(".")[1] != room and n.split(".")[1] not in allowed)
            if bad:
                offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders


def test_the_leaves_import_no_room() -> None:
    for leaf in LEAVES:
        path = ROOT / (leaf.replace(".", "/") + ".py")
        assert not [n for n in imported_modules(path) if n.startswith("service.") and n not in LEAVES], leaf
