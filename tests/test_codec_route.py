"""service.frontend.api.routing.CodecRoute answers exactly as FastAPI's own handler would, and documents the same."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel

from service.frontend.api import v1, v2
from service.frontend.api.routing import CodecRoute


class Item(BaseModel):
    name: str
    version: str | None = None
    note: str | None = None
    size: int = 0


def _app(route_class: type) -> FastAPI:
    router = APIRouter(prefix="/x", route_class=route_class)

    @router.get("/items/{name}", response_model=Item, response_model_exclude_none=True)
    @router.get("/items/{name}/versions/{version}", response_model=Item, response_model_exclude_none=True)
    async def item(name: str, request: Request, version: str | None = None) -> Item:
        return Item(name=name, version=version, size=len(request.url.path))

    @router.post("/items/{name}/keep", response_model=Item, status_code=201)
    async def keep(name: str) -> Item:
        return Item(name=name, note=None)

    @router.get("/raw", response_model=Item)
    async def raw() -> Response:
        return Response(b"raw bytes", media_type="text/plain")

    @router.get("/wrong", response_model=Item)
    async def wrong() -> Item:
        return {"name": "a dict, not an Item"}  # type: ignore[return-value]

    @router.get("/limit", response_model=Item)
    async def limit(n: int = 1) -> Item:  # an int query parameter: FastAPI's own handler validates it
        return Item(name="n", size=n)

    app = FastAPI()
    app.router.routes.extend(router.routes)
    return app


def test_codec_route_answers_as_fastapi_does() -> None:
    ours, theirs = TestClient(_app(CodecRoute), raise_server_exceptions=False), TestClient(_app(APIRoute))
    for method, url in [("GET", "/x/items/a"), ("GET", "/x/items/a?version=7"), ("GET", "/x/items/a/versions/3"),
                        ("GET", "/x/items/a/versions/3?version=9"), ("POST", "/x/items/b/keep"), ("GET", "/x/raw"),
                        ("GET", "/x/limit?n=5"), ("GET", "/x/limit?n=five")]:
        a, b = ours.request(method, url), theirs.request(method, url)
        assert (a.status_code, a.headers["content-type"], a.content) == (b.status_code, b.headers["content-type"], b.content), url
    assert ours.get("/x/items/a?version=7").json() == {"name": "a", "version": "7", "size": 10}
    assert ours.post("/x/items/b/keep").json() == {"name": "b", "version": None, "note": None, "size": 0}  # exclude_none only where asked
    assert not [r for r in ours.app.routes if r.path == "/x/limit"][0]._direct()  # an int parameter: FastAPI validates it
    assert ours.get("/x/wrong").status_code == 500  # a return value that is not the response model is a bug, not a guess
    assert ours.app.openapi() == theirs.app.openapi()


def test_every_codec_route_is_called_directly() -> None:
    """The v1 and v2 routes take only str path/query parameters and the request: none falls back to
    FastAPI's dependency-solving handler (``bench/frontend_app.py`` measures what that costs)."""
    routes = [r for r in (*v1.router.routes, *v2.router.routes) if isinstance(r, CodecRoute)]
    assert len(routes) == len(v1.router.routes) + len(v2.router.routes)
    assert [r.path for r in routes if not r._direct()] == []
