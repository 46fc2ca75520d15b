"""The simulator's admin interface: fault injection over HTTP, loopback only.

Endpoints (all answer JSON)::

    GET  /status                              clients, open requests, pending faults
    POST /faults/disconnect                   close every client connection now
    POST /faults/reset?pause=2&restore=1102   nightly reset: 1100, pause, 1102 or 'close'
    POST /faults/pacing?count=N               answer the next N historical requests with 162
    POST /faults/stall?count=N                never answer the next N historical requests
    POST /faults/error322?count=N             fail the next N historical requests with 322

Example: ``curl -X POST 'http://127.0.0.1:PORT/faults/pacing?count=3'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from .server import GatewayServer

log = logging.getLogger(__name__)

_FAULT_COUNTERS = {"pacing": "pacing", "stall": "stall", "error322": "error_322"}


def _int_arg(query: dict[str, list[str]], name: str, default: int) -> int:
    raw = query.get(name, [str(default)])[0]
    value = int(raw)
    if value < 0:
        raise ValueError(f"{name} must be >= 0")
    return value


async def handle(gw: GatewayServer, method: str, target: str) -> tuple[int, dict[str, Any]]:
    url = urlsplit(target)
    query = parse_qs(url.query)
    path = url.path.rstrip("/")
    if method == "GET" and path == "/status":
        return 200, {
            "clients": sorted(gw.clients),
            "open_historical_requests": len(gw.open_requests),
            "faults": vars(gw.faults),
            "clock": gw.clock.now().isoformat(),
        }
    if method != "POST":
        return 405, {"error": f"{method} {path} is not allowed; fault injection uses POST"}
    if path == "/faults/disconnect":
        return 200, {"disconnected": gw.disconnect_all()}
    if path == "/faults/reset":
        pause = float(query.get("pause", ["2"])[0])
        restore = query.get("restore", ["1102"])[0]
        if restore not in ("1102", "close") or pause < 0:
            return 400, {"error": "restore must be 1102 or close, pause >= 0"}
        asyncio.get_running_loop().create_task(gw.nightly_reset(pause, restore))
        return 200, {"reset": restore, "pause": pause}
    name = path.removeprefix("/faults/")
    if name in _FAULT_COUNTERS:
        attr = _FAULT_COUNTERS[name]
        count = _int_arg(query, "count", 1)
        setattr(gw.faults, attr, getattr(gw.faults, attr) + count)
        return 200, {name: getattr(gw.faults, attr)}
    return 404, {"error": f"unknown endpoint {path}",
                 "endpoints": ["/status", "/faults/disconnect", "/faults/reset",
                               "/faults/pacing", "/faults/stall", "/faults/error322"]}


async def _serve(gw: GatewayServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    try:
        line = (await asyncio.wait_for(reader.readline(), 10)).decode("latin-1").strip()
        while (await asyncio.wait_for(reader.readline(), 10)).strip():
            pass  # headers are not needed
        parts = line.split()
        if len(parts) != 3:
            status, body = 400, {"error": f"malformed request line {line[:80]!r}"}
        else:
            try:
                status, body = await handle(gw, parts[0].upper(), parts[1])
            except ValueError as exc:
                status, body = 400, {"error": str(exc)}
        payload = json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n".encode() + payload
        )
        await writer.drain()
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def start_admin(gw: GatewayServer, port: int) -> asyncio.base_events.Server:
    """Serve the admin interface on 127.0.0.1 only, whatever host the gateway uses."""
    return await asyncio.start_server(lambda r, w: _serve(gw, r, w), "127.0.0.1", port)
