"""The codecs' route class: FastAPI's route and its documentation, with a direct call to the endpoint.

The codecs parse their bodies themselves (:mod:`service.frontend.api.inputs`: orjson, then the pydantic request
models, with errors worded for the client), so what FastAPI's request handler adds to each call
(dependency solving, its body and response-validation paths) is unused work. With the routes on the
app's own router (not ``include_router``), a 1-row score request costs the ASGI app 101 µs instead of
169 on the 2-core machine (``bench/frontend_app.py``, ``docs/benchmarks.md``). :class:`CodecRoute` keeps
everything FastAPI derives from the endpoint, including ``/openapi.json``, and replaces only that
handler, with FastAPI's extension point for it (``APIRoute.get_route_handler``). The call is made
directly when the endpoint takes only ``str`` path and query parameters and the ``Request``, as every
codec route does; any other route keeps FastAPI's handler.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute
from pydantic import BaseModel

_TEXT = (str, str | None)


class CodecRoute(APIRoute):
    """An :class:`~fastapi.routing.APIRoute` that calls a plain endpoint without dependency solving.

    The endpoint's return value is answered as FastAPI would: a :class:`Response` as it is, an
    instance of the route's ``response_model`` as its JSON (by alias, and without ``None`` fields
    when ``response_model_exclude_none``), with the route's status code.
    """

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        if not self._direct():
            return super().get_route_handler()
        d = self.dependant
        endpoint, model = self.endpoint, self.response_model
        path = [f.name for f in d.path_params]
        query = [(f.name, f.alias, f.field_info.default) for f in d.query_params]
        request_name = d.request_param_name
        status, exclude_none, by_alias = self.status_code or 200, self.response_model_exclude_none, self.response_model_by_alias

        async def handler(request: Request) -> Response:
            kwargs: dict[str, Any] = {name: request.path_params[name] for name in path}
            if query:
                given = request.query_params if request.scope.get("query_string") else {}
                kwargs.update((name, given.get(alias, default)) for name, alias, default in query)
            if request_name is not None:
                kwargs[request_name] = request
            result = await endpoint(**kwargs)
            if isinstance(result, Response):
                return result
            if type(result) is not model:
                raise TypeError(f"{endpoint.__name__} returned {type(result).__name__}, not its response model {model.__name__}")
            return Response(result.model_dump_json(by_alias=by_alias, exclude_none=exclude_none), status_code=status,
                            media_type="application/json")

        return handler

    def _direct(self) -> bool:
        """Whether the endpoint can be called directly: a coroutine of ``str`` path/query parameters and
        the request, answering a pydantic model with FastAPI's default response class."""
        d = self.dependant
        if (d.header_params or d.cookie_params or d.body_params or d.dependencies or d.background_tasks_param_name
                or d.response_param_name or d.security_scopes_param_name or d.websocket_param_name
                or d.http_connection_param_name):
            return False
        if not inspect.iscoroutinefunction(self.endpoint) or not isinstance(self.response_class, DefaultPlaceholder):
            return False
        if not (isinstance(self.response_model, type) and issubclass(self.response_model, BaseModel)):
            return False
        if self.response_model_include or self.response_model_exclude or self.response_model_exclude_unset \
                or self.response_model_exclude_defaults:
            return False
        return all(f.field_info.annotation in _TEXT for f in (*d.path_params, *d.query_params))
