"""The ``flowserve`` command line: the model library's commands (:mod:`models.cli`) and ``serve``.

It sits above both packages, so that ``models`` imports nothing from ``service``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from models.cli import app, user_errors


@app.command()
@user_errors
def serve(
    repository: Optional[Path] = typer.Option(None, "--repository", help="model repository root (FLOWSERVE_REPOSITORY)"),
    host: Optional[str] = typer.Option(None, "--host", help="bind address (FLOWSERVE_HOST, default 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, "--port", help="port (FLOWSERVE_PORT, default 8000)"),
) -> None:
    """Serve the models in a repository (<root>/<name>/<version>/) over HTTP."""
    from .server import serve as run
    from .settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in {"repository": repository, "host": host, "port": port}.items() if v is not None}
    run(Settings(**overrides))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
