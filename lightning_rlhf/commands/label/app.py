"""The labelling web app (Starlette): the page, ``GET /api/next`` and ``POST /api/label`` over a ``LabelStore``.

Needs the ``label`` extra (``pip install "lightning_rlhf[label]"``). Model output reaches the page only as JSON and
is put on it as text (``textContent``), and the Content-Security-Policy allows no inline script, so a response
that holds HTML or a script is shown, never run.
"""

from __future__ import annotations

import hmac
import json
from importlib.resources import files

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lightning_rlhf.commands.label.store import LabelError, LabelStore

STATIC = files("lightning_rlhf.commands.label") / "static"


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def make_app(store: LabelStore, token: str | None = None) -> Starlette:
    """The app over ``store``; with ``token``, every ``/api/`` request must carry ``Authorization: Bearer TOKEN``."""

    async def next_item(request: Request) -> Response:
        labeller = request.query_params.get("labeller", "").strip()
        if not labeller:
            return _error("give your name: /api/next?labeller=NAME", 400)
        item = store.next_item(labeller)
        return Response(status_code=204) if item is None else JSONResponse(item)

    async def label(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return _error(f"the body is not JSON: {err}", 400)
        try:
            record = store.add(body)
        except LabelError as err:
            return _error(str(err), err.status)
        return JSONResponse({"ok": True, **store.progress(record["labeller"])})

    async def page(request: Request) -> Response:
        return Response((STATIC / "index.html").read_text(encoding="utf-8"), media_type="text/html")

    async def guard(request: Request, call_next) -> Response:
        if token and request.url.path.startswith("/api/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return _error("missing or wrong token: send 'Authorization: Bearer TOKEN'", 401)
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/next", next_item),
            Route("/api/label", label, methods=["POST"]),
            Mount("/static", StaticFiles(directory=str(STATIC))),
        ],
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard)],
    )
