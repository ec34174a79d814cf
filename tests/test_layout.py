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
