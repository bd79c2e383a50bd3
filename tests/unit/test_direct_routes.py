"""The direct lane answers exactly as the routed path does, and only for request-only endpoints."""

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.testclient import TestClient

from service.direct_routes import DirectRoutes


class Refused(Exception):
    pass


async def guard(request: Request) -> None:
    if request.headers.get("authorization") != "Bearer k":
        raise Refused()


def tiny_app(direct: bool) -> FastAPI:
    router = APIRouter()
    calls = []

    @router.post("/echo")
    async def echo(request: Request):
        calls.append(request.scope.get("route").path)
        body = await request.body()
        if body == b"boom":
            raise ValueError("bad body")
        return Response(body[::-1], media_type="text/plain", headers={"x-seen": "1"})

    app = FastAPI()
    app.state.calls = calls

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        return JSONResponse({"error": "unauthorized"}, status_code=401)

    @app.exception_handler(ValueError)
    async def invalid(request: Request, e: ValueError):
        return JSONResponse({"error": str(e)}, status_code=422)

    app.include_router(router, dependencies=[Depends(guard)])
    if direct:
        app.add_middleware(DirectRoutes, fastapi=app, routes=router.routes, guards=(guard,))
    return app


def answers(app: FastAPI) -> list:
    with TestClient(app) as c:
        auth = {"authorization": "Bearer k"}
        rs = [
            c.post("/echo", content=b"abc", headers=auth),
            c.post("/echo", content=b"boom", headers=auth),  # the app's exception handler
            c.post("/echo", content=b"abc"),  # the guard refuses
            c.get("/echo", headers=auth),  # another method: routed (405)
            c.post("/nope", headers=auth),  # another path: routed (404)
        ]
        return [(r.status_code, r.content, r.headers.get("x-seen"), r.headers.get("allow")) for r in rs]


def test_the_direct_lane_answers_as_the_router_does():
    routed, direct = answers(tiny_app(False)), answers(tiny_app(True))
    assert direct == routed
    assert [a[0] for a in direct] == [200, 422, 401, 405, 404]
    assert direct[0][1] == b"cba"


def test_the_lane_takes_the_request_and_names_the_route():
    app = tiny_app(True)
    stack = app.build_middleware_stack()
    while not isinstance(stack, DirectRoutes):
        stack = stack.app
    assert list(stack.lanes) == [("POST", "/echo")]
    with TestClient(app) as c:
        c.post("/echo", content=b"x", headers={"authorization": "Bearer k"})
    assert app.state.calls == ["/echo"]  # scope["route"] is set as routing sets it


def test_an_endpoint_with_parameters_cannot_take_the_lane():
    router = APIRouter()

    @router.post("/items/{item_id}")
    async def with_path(request: Request, item_id: str):
        return Response()

    app = FastAPI()
    with pytest.raises(ValueError, match="cannot take the direct lane"):
        DirectRoutes(app, app, router.routes)


def test_the_served_app_sends_vqa_and_caption_down_the_lane(tmp_path):
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(models=str(tmp_path)))
    stack = app.build_middleware_stack()
    while not isinstance(stack, DirectRoutes):
        stack = stack.app
    assert sorted(stack.lanes) == [("POST", "/caption"), ("POST", "/vqa")]
