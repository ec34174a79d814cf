"""The one place errors become HTTP: an exception that escapes a route is a logged 500 with a request id."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.server import create_app
from service.settings import Settings


def test_an_escaping_exception_is_a_500_with_the_logged_request_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(devices=["cpu"], repository=tmp_path))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    with caplog.at_level(logging.ERROR, logger="service.frontend.app"), TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom", headers={"x-request-id": "req-42"})
        other = client.get("/boom")
    assert r.status_code == 500 and r.json()["request_id"] == "req-42" and "req-42" in r.json()["error"]
    assert "secret" not in r.text  # the client sees the id, not the exception's message
    assert r.headers["x-request-id"] == "req-42"
    assert other.json()["request_id"] != "req-42" and len(other.json()["request_id"]) == 32
    logged = [rec for rec in caplog.records if "req-42" in rec.getMessage()]
    assert logged and logged[0].exc_info is not None


def test_unknown_model_is_a_404_with_an_error_body(tmp_path: Path) -> None:
    app = create_app(Settings(devices=["cpu"], repository=tmp_path))
    with TestClient(app) as client:
        r = client.get("/v2/models/x/versions/1/ready")
        assert r.status_code == 404 and set(r.json()) == {"error"}
