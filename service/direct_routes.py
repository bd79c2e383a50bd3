"""A direct lane for the hot task endpoints (POST /vqa, /caption): the request goes from the
middleware stack straight to its endpoint, past Starlette's route matching and FastAPI's
dependency solving. Those two cost ~10% of the event loop's time a request under load (py-spy,
`serve --workers 2`, 64 clients), time the inference threads need on a 2-core machine.

Only endpoints that FastAPI would call with nothing but the Request qualify: `async def f(request)`
returning a Response, whose dependencies (the API key check) also take only the Request. The lane
calls those dependencies, then the endpoint, inside the app's own exception handlers, so answers,
errors and headers are the ones the routed path gives. Everything else (other methods on the same
path, other routes, every request while tracing is on) goes through the router as before; the
routes stay registered, so OpenAPI, 405s and HEAD are unchanged.
"""

from __future__ import annotations

import inspect

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import request_response


def _request_only(call) -> bool:
    """An async callable whose one parameter is a starlette/FastAPI Request."""
    if not inspect.iscoroutinefunction(call):
        return False
    params = list(inspect.signature(call).parameters.values())
    return len(params) == 1 and params[0].annotation in (Request, "Request")


def direct_endpoint(route: APIRoute, guards: tuple = ()):
    """`request -> Response` running the guards (the dependencies the route was included with),
    its own dependencies, then its endpoint; None when the route needs FastAPI to solve anything
    else (path, query or body parameters)."""
    guards = (*guards, *(d.call for d in route.dependant.dependencies))
    if route.param_convertors or not _request_only(route.endpoint) or not all(_request_only(g) for g in guards):
        return None
    endpoint = route.endpoint

    async def run(request: Request):
        for guard in guards:
            await guard(request)
        return await endpoint(request)

    return run


class DirectRoutes:
    """Pure ASGI middleware, innermost of the app's own: (method, path) of a given route -> its
    endpoint under the app's exception handlers; anything else -> the rest of the stack.

    routes: the APIRoutes of routers included without a prefix; guards: the dependencies they
    were included with (called first, in order)."""

    def __init__(self, app, fastapi: FastAPI, routes: list, guards: tuple = ()) -> None:
        self.app = app
        handlers = {k: v for k, v in fastapi.exception_handlers.items() if k not in (500, Exception)}
        self.lanes: dict[tuple[str, str], tuple[APIRoute, object]] = {}
        for route in routes:
            run = direct_endpoint(route, guards)
            if run is None:
                raise ValueError(f"{route.path} cannot take the direct lane: its endpoint needs more than the Request")
            lane = ExceptionMiddleware(request_response(run), handlers=handlers)
            for method in route.methods:
                self.lanes[(method, route.path)] = (route, lane)

    async def __call__(self, scope, receive, send):
        # with tracing on, FastAPI's request span learns its route from the router: routed, then
        if scope["type"] == "http" and scope.get("fastapi.telemetry") is None:
            hit = self.lanes.get((scope["method"], scope["path"]))
            if hit is not None:
                route, lane = hit
                scope["route"], scope["endpoint"] = route, route.endpoint  # as routing sets them (tracing names the span)
                return await lane(scope, receive, send)
        await self.app(scope, receive, send)
