"""README's curl examples run against a real server over the bundled repository and answer the
status codes README documents: 200, unless the comment above them lists codes (``→ 400``), one
per command below it, in order."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from tests.server import running_server

ROOT = Path(__file__).resolve().parent.parent
STATUS = re.compile(r"→\s*(\d{3})")


def curl_examples() -> list[tuple[str, int]]:
    """``(command, expected status)`` for every curl command in README's service examples."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("```bash\n# list and describe models") :]
    block = block[: block.index("```", 3)]
    out, expected = [], []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("#"):
            expected = [int(c) for c in STATUS.findall(line)]
        elif line.startswith("curl"):
            out.append((line, expected.pop(0) if expected else 200))
    return out


def test_readme_has_curl_examples() -> None:
    examples = curl_examples()
    assert len(examples) >= 12
    assert {status for _, status in examples} >= {200, 400, 404}


def test_readme_curl_examples_answer_as_documented(tmp_path: Path) -> None:
    with running_server(ROOT / "model_repository", tmp_path) as s:
        for command, status in curl_examples():
            cmd = command.replace("localhost:8000", f"127.0.0.1:{s.port}").split("|")[0]
            argv = [*shlex.split(cmd), "-o", str(tmp_path / "body"), "-w", "%{http_code}", "--max-time", "120"]
            got = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, check=False).stdout.strip()
            assert got == str(status), (command, got, (tmp_path / "body").read_bytes()[:300])


def test_readme_configuration_table_lists_every_setting() -> None:
    """Each ``Settings`` field has a row in README's ``FLOWSERVE_*`` table, and each row names a real field."""
    from service.settings import Settings

    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Configuration (`FLOWSERVE_*`") :].split("\n\n")[1]
    first_cells = [row.split("|")[1] for row in table.splitlines() if row.startswith("| `FLOWSERVE_")]
    documented = set(re.findall(r"FLOWSERVE_([A-Z0-9_]+)", "\n".join(first_cells)))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - documented == set(), "settings missing from README's table"
    assert documented - fields == set(), "README's table names settings that do not exist"
