"""The ``flowserve`` command line: the model library's commands (:mod:`models.cli`), ``serve``, ``health`` and ``doctor``.

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
    from service.server import serve as run
    from service.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in {"repository": repository, "host": host, "port": port}.items() if v is not None}
    run(Settings(**overrides))


@app.command()
def health(
    ready: bool = typer.Option(False, "--ready", help="probe readiness (every model loaded) instead of liveness"),
    port: Optional[int] = typer.Option(None, "--port", help="port (FLOWSERVE_PORT, default 8000)"),
    timeout: float = typer.Option(4.0, "--timeout", help="seconds to wait for the answer"),
) -> None:
    """Exit 0 when the server on this machine answers its health route with 200, else 1: the container's HEALTHCHECK.

    It probes ``127.0.0.1`` on the port the server was given (``FLOWSERVE_PORT``), whatever address it binds.
    Liveness (``/v2/health/live``) by default: a server still loading its models is alive, and restarting
    it would not help; readiness (``/v2/health/ready``) with ``--ready``.
    """
    import urllib.error
    import urllib.request

    from service.settings import Settings

    route = "/v2/health/ready" if ready else "/v2/health/live"
    url = f"http://127.0.0.1:{port or Settings().port}{route}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback, a fixed scheme
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, ValueError) as e:
        typer.echo(f"{url}: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{url}: {status}")
    raise typer.Exit(0 if status == 200 else 1)


@app.command()
@user_errors
def doctor(
    repository: Optional[Path] = typer.Option(None, "--repository", help="model repository root (FLOWSERVE_REPOSITORY)"),
    models: bool = typer.Option(True, "--models/--no-models", help="load the repository's models to report their paths"),
) -> None:
    """Print the devices and versions (driver, CUDA, torch, ONNX Runtime, Triton), which fast paths are usable
    here and why not, and for each model of the repository which path each task runs on and why."""
    from service.doctor import diagnose
    from service.settings import Settings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings(**({"repository": repository} if repository is not None else {}))
    typer.echo(diagnose(settings, models).text())


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
