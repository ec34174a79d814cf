"""The API contract, fuzzed: schemathesis over the service's own ``/openapi.json`` against a real server.

Every documented operation gets generated requests (valid and invalid bodies, paths and query
parameters); each response must not be a 5xx and must match the schema documented for its
status code. The counts are printed at the end of the module (``-s`` shows them).
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.server import Server

EXAMPLES = 30  # per operation: bounded, about a minute on 2 cores


@pytest.fixture(scope="module")
def tally() -> Counter:
    counts: Counter = Counter()
    yield counts
    codes = {k: v for k, v in sorted(counts.items(), key=str) if isinstance(k, int)}
    print(f"\nschemathesis: {counts['cases']} cases, {counts['5xx']} 5xx, status codes {codes}")


def _openapi() -> dict:
    """The document the server serves at ``/openapi.json`` (it does not depend on the loaded models;
    ``test_served_schema_is_the_tested_one`` checks that)."""
    from service.server import create_app
    from service.settings import Settings

    return create_app(Settings(devices=["cpu"])).openapi()


schema = schemathesis.openapi.from_dict(_openapi())
schemathesis.serializer.alias("application/x-npy", "application/octet-stream")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_error_and_documented_responses(case, server: Server, tally: Counter) -> None:  # noqa: ANN001
    # Three cases in four address the served model, so bodies reach the codecs and the core;
    # the rest keep the generated (mostly unknown) names.
    if "name" in (case.path_parameters or {}) and tally["cases"] % 4:
        case.path_parameters["name"] = "digits"
        if "version" in case.path_parameters and tally["cases"] % 8 < 4:
            case.path_parameters["version"] = "1"
    response = case.call(base_url=server.url, timeout=60)
    tally["cases"] += 1
    tally[response.status_code] += 1
    tally["5xx"] += response.status_code >= 500
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])


def test_served_schema_is_the_tested_one(server: Server) -> None:
    import httpx

    assert httpx.get(f"{server.url}/openapi.json").json() == _openapi()


def test_every_post_route_documents_its_bodies() -> None:
    spec = _openapi()
    posts = {path: ops["post"] for path, ops in spec["paths"].items() if "post" in ops}
    assert len(posts) >= 5
    for path, op in posts.items():
        if not path.endswith(("/reload", "/drift/reset")):  # these two take no body (reset: a query parameter)
            assert "application/json" in op["requestBody"]["content"], path
            assert op["requestBody"]["content"]["application/json"]["schema"].get("properties"), path
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok.get("$ref") or ok.get("properties"), path
        for code in ("401", "500", "503"):
            assert code in op["responses"], (path, code)
