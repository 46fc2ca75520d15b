"""The simulator's HTTP applications (starlette): the Client Portal Web API v1 and the
loopback admin interface.

This module only binds HTTP to behaviour: routes, query parameters and bodies in, JSON out.
What the endpoints do lives in :mod:`~ktrdr_pipeline.simulator.portal` and
:mod:`~ktrdr_pipeline.simulator.admin`, reached through :class:`PortalApi` and
:class:`AdminApi`; they signal client errors with :class:`ApiError`. Every answer,
errors included, is JSON: the portal's errors as the real gateway sends them
(``{"error": message, "statusCode": status}``), the admin's as ``{"error": message}``.
Unknown paths answer 404, known paths with the wrong method 405 and HTTP versions other
than 1.0 and 1.1 answer 505, also in JSON. Trailing slashes are ignored (``/tickle/`` is
``/tickle``). Requests the HTTP stack (uvicorn with h11) cannot parse get its own plain
``400 Bad Request`` and the connection is closed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

PORTAL_PREFIX = "/v1/api"
#: The largest request body accepted (413 beyond).
MAX_BODY_BYTES = 1 << 20
PORTAL_HEADERS = {"Cache-Control": "no-cache, no-store",
                  "Server": "ktrdr-client-portal-simulator"}
ADMIN_ENDPOINTS = ["/status", "/faults/disconnect", "/faults/reset", "/faults/pacing",
                   "/faults/stall", "/faults/error322", "/faults/hmds_unknown",
                   "/faults/outside_sessions"]


class ApiError(Exception):
    """A client error: HTTP ``status`` with ``message`` (and, for the admin, more keys)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


class PortalApi(Protocol):
    """The Client Portal endpoints (see :class:`~ktrdr_pipeline.simulator.portal.ClientPortal`);
    each returns the JSON payload of a 200 answer or raises :class:`ApiError`."""

    async def tickle(self) -> Any: ...
    async def auth_status(self) -> Any: ...
    async def portfolio_accounts(self) -> Any: ...
    async def positions(self, account: str, page: str | None) -> Any: ...
    async def iserver_accounts(self) -> Any: ...
    async def snapshot(self, conids_text: str | None, fields_text: str | None) -> Any: ...
    async def unsubscribe_all(self) -> Any: ...
    async def unsubscribe(self, body: Any) -> Any: ...


class AdminApi(Protocol):
    """The admin endpoints (see :class:`~ktrdr_pipeline.simulator.admin.Admin`); query
    parameters arrive as text (None when absent)."""

    def status(self) -> Any: ...
    def disconnect(self) -> Any: ...
    def reset(self, pause: str | None, restore: str | None) -> Any: ...
    def inject(self, fault: str, count: str | None) -> Any: ...
    def outside_sessions(self, symbol: str | None, at: str | None,
                         minutes: str | None) -> Any: ...
    def clear_outside_sessions(self) -> Any: ...


class JsonAnswer(JSONResponse):
    """Compact JSON; NaN and infinity are refused (``ValueError``) as JSON has neither."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":"), allow_nan=False).encode()


ErrorBody = Callable[[int, str], dict[str, Any]]
Handler = Callable[[Request], Awaitable[Any]]


class _HttpOneOnly:
    """Answer 505 to any HTTP version but 1.0 and 1.1 (h11 parses ``HTTP/9.9`` as well), and
    route ``/a/b/`` as ``/a/b`` (instead of starlette's redirect)."""

    def __init__(self, app: ASGIApp, error_body: ErrorBody):
        self.app = app
        self.error_body = error_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope.get("http_version") not in ("1.0", "1.1"):
                answer = JsonAnswer(self.error_body(505, "only HTTP/1.0 and HTTP/1.1 are "
                                                    "supported"), 505)
                await answer(scope, receive, send)
                return
            path = scope.get("path", "")
            if len(path) > 1 and path.endswith("/"):
                scope = {**scope, "path": path.rstrip("/") or "/"}
        await self.app(scope, receive, send)


def _endpoint(handler: Handler, error_body: ErrorBody,
              headers: Mapping[str, str] | None) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            return JsonAnswer(await handler(request), headers=headers)
        except ApiError as exc:
            return JsonAnswer(error_body(exc.status, exc.message), exc.status, headers=headers)
        except Exception:  # a bug in one endpoint must not take the server down
            log.exception("%s %s failed", request.method, request.url.path)
            return JsonAnswer(error_body(500, "internal error"), 500, headers=headers)

    return endpoint


def _app(routes: list[tuple[str, list[str], Handler]], error_body: ErrorBody,
         not_found: Callable[[Request], str], not_allowed: Callable[[Request], str],
         headers: Mapping[str, str] | None = None) -> Starlette:
    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            message = not_allowed(request)
        elif exc.status_code == 404:
            message = not_found(request)
        else:
            message = exc.detail
        return JsonAnswer(error_body(exc.status_code, message), exc.status_code,
                          headers={**(headers or {}), **(exc.headers or {})})

    return Starlette(
        routes=[Route(path, _endpoint(h, error_body, headers), methods=methods)
                for path, methods, h in routes],
        middleware=[Middleware(_HttpOneOnly, error_body=error_body)],
        exception_handlers={HTTPException: http_error},
    )


async def read_json(request: Request) -> Any:
    """The request's JSON body (None if empty); 400 if it is not JSON, 413 if too large."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None


def _param(request: Request, name: str) -> str | None:
    """A query parameter; repeated ones are joined with commas."""
    values = request.query_params.getlist(name)
    return ",".join(values) if values else None


def portal_error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": message, "statusCode": status}


def build_portal_app(api: PortalApi) -> Starlette:
    """The Client Portal Web API v1 under ``/v1/api``."""
    get, both = ["GET"], ["GET", "POST"]

    async def positions(r: Request) -> Any:
        return await api.positions(r.path_params["account"], r.path_params.get("page"))

    async def snapshot(r: Request) -> Any:
        return await api.snapshot(_param(r, "conids"), _param(r, "fields"))

    async def unsubscribe(r: Request) -> Any:
        return await api.unsubscribe(await read_json(r))

    p = PORTAL_PREFIX
    routes: list[tuple[str, list[str], Handler]] = [
        (f"{p}/tickle", both, lambda r: api.tickle()),
        (f"{p}/iserver/auth/status", both, lambda r: api.auth_status()),
        (f"{p}/portfolio/accounts", get, lambda r: api.portfolio_accounts()),
        (f"{p}/portfolio/{{account}}/positions", get, positions),
        (f"{p}/portfolio/{{account}}/positions/{{page}}", get, positions),
        (f"{p}/iserver/accounts", get, lambda r: api.iserver_accounts()),
        (f"{p}/iserver/marketdata/snapshot", get, snapshot),
        (f"{p}/iserver/marketdata/unsubscribeall", both, lambda r: api.unsubscribe_all()),
        (f"{p}/iserver/marketdata/unsubscribe", ["POST"], unsubscribe),
    ]
    return _app(routes, portal_error_body, lambda r: f"no such endpoint: {r.url.path}",
                lambda r: f"method {r.method} not allowed on {r.url.path}", PORTAL_HEADERS)


def admin_error_body(status: int, message: str) -> dict[str, Any]:
    body: dict[str, Any] = {"error": message}
    if status == 404:
        body["endpoints"] = ADMIN_ENDPOINTS
    return body


def build_admin_app(api: AdminApi) -> Starlette:
    """The admin interface: ``GET /status`` and ``POST /faults/...``."""

    async def status(r: Request) -> Any:
        return api.status()

    async def disconnect(r: Request) -> Any:
        return api.disconnect()

    async def reset(r: Request) -> Any:
        return api.reset(r.query_params.get("pause"), r.query_params.get("restore"))

    async def inject(r: Request) -> Any:
        return api.inject(r.path_params["fault"], r.query_params.get("count"))

    async def outside_sessions(r: Request) -> Any:
        if r.method == "DELETE":
            return api.clear_outside_sessions()
        q = r.query_params
        return api.outside_sessions(q.get("symbol"), q.get("at"), q.get("minutes"))

    routes: list[tuple[str, list[str], Handler]] = [
        ("/status", ["GET"], status),
        ("/faults/disconnect", ["POST"], disconnect),
        ("/faults/reset", ["POST"], reset),
        ("/faults/outside_sessions", ["POST", "DELETE"], outside_sessions),
        ("/faults/{fault}", ["POST"], inject),
    ]
    return _app(routes, admin_error_body, lambda r: f"unknown endpoint {r.url.path}",
                lambda r: f"{r.method} {r.url.path} is not allowed; fault injection uses POST")
