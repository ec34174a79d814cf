"""``/docs`` renders on a closed network: a real headless browser (Debian's chromium) with every host but
loopback unresolvable loads the served Swagger UI and draws the API's operations. A control page that takes
Swagger UI from its CDN, as FastAPI's default page does, draws nothing under the same rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")

CLOSED_NETWORK = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


def rendered(url: str, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran, in headless chromium that can reach loopback only."""
    argv = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", f"--host-resolver-rules={CLOSED_NETWORK}",
            "--virtual-time-budget=15000", "--dump-dom", url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout


def test_docs_render_the_operations_without_network(server, tmp_path: Path) -> None:  # noqa: ANN001
    dom = rendered(f"{server.url}/docs", tmp_path)
    assert "opblock" in dom, dom[:2000]  # Swagger UI drew the operations
    for path in ("/v1/models/{name}/score", "/v1/models/{name}/anomaly", "/v1/models/{name}/drift"):
        assert path in dom


def test_a_cdn_page_draws_nothing_under_the_same_rules(server, tmp_path: Path) -> None:  # noqa: ANN001
    from fastapi.openapi.docs import get_swagger_ui_html

    page = tmp_path / "cdn.html"
    page.write_text(get_swagger_ui_html(openapi_url=f"{server.url}/openapi.json", title="cdn").body.decode())
    dom = rendered(page.as_uri(), tmp_path)
    assert "opblock" not in dom and "/v1/models/{name}/score" not in dom
