"""The simulator's HTTP side (``gateway.http_app`` on ``gateway.http_server``): the admin
interface over uvicorn, JSON errors, and the server's own lifecycle."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
import requests

from ktrdr_pipeline.simulator.http_app import ApiError, build_admin_app, build_portal_app
from ktrdr_pipeline.simulator.http_server import HttpServer


def _admin(gateway, method: str, path: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{gateway.server.admin_port}{path}",
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        assert exc.headers["Content-Type"].startswith("application/json")
        return exc.code, json.loads(exc.read())


def test_admin_status_and_faults_over_uvicorn(gateway):
    status, body = _admin(gateway, "GET", "/status")
    assert status == 200
    assert body["clients"] == [] and body["open_historical_requests"] == 0
    assert body["faults"] == {"pacing": 0, "stall": 0, "error_322": 0, "hmds_unknown": 0}
    assert _admin(gateway, "POST", "/faults/hmds_unknown") == (200, {"hmds_unknown": 1})
    assert _admin(gateway, "POST", "/faults/stall?count=2") == (200, {"stall": 2})
    assert _admin(gateway, "POST", "/faults/stall/") == (200, {"stall": 3})  # trailing slash
    assert _admin(gateway, "GET", "/status/")[1]["faults"]["stall"] == 3


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("POST", "/faults/nope", 404, "unknown endpoint /faults/nope"),
        ("GET", "/elsewhere", 404, "unknown endpoint /elsewhere"),
        ("GET", "/faults/pacing", 405, "fault injection uses POST"),
        ("POST", "/faults/pacing?count=x", 400, "count must be an integer"),
        ("POST", "/faults/pacing?count=-1", 400, "count must be >= 0"),
        ("POST", "/faults/reset?restore=later", 400, "restore must be 1102 or close"),
        ("POST", "/faults/reset?pause=soon", 400, "pause must be a number"),
    ],
)
def test_admin_errors_are_json(gateway, method, path, status, error):
    got, body = _admin(gateway, method, path)
    assert got == status and error in body["error"], body
    if status == 404:
        assert "/faults/pacing" in body["endpoints"]
    assert _admin(gateway, "GET", "/status")[1]["faults"]["pacing"] == 0


def test_admin_rejects_other_http_versions_with_505(gateway):
    with socket.create_connection(("127.0.0.1", gateway.server.admin_port), timeout=5) as sock:
        sock.sendall(b"GET /status HTTP/9.9\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 505 ") and "HTTP/1.1" in json.loads(body)["error"]


class _Portal:
    """A portal whose endpoints fail in the ways the HTTP binding must map."""

    async def tickle(self) -> Any:
        return {"nan": float("nan")}  # not JSON: 500

    async def auth_status(self) -> Any:
        raise RuntimeError("a bug")  # 500, and the server lives on

    async def portfolio_accounts(self) -> Any:
        raise ApiError(500, "Please query /accounts first")

    async def positions(self, account: str, page: str | None) -> Any:
        return {"account": account, "page": page}

    async def iserver_accounts(self) -> Any:
        return {}

    async def snapshot(self, conids_text: str | None, fields_text: str | None) -> Any:
        return {"conids": conids_text, "fields": fields_text}

    async def unsubscribe_all(self) -> Any:
        return {"unsubscribed": True}

    async def unsubscribe(self, body: Any) -> Any:
        return {"body": body}


def test_portal_binding_and_http_server_lifecycle():
    async def main() -> dict[str, Any]:
        server = await HttpServer(build_portal_app(_Portal()), "127.0.0.1", 0).start()
        assert server.port > 0 and server.sockets[0].getsockname()[1] == server.port
        base = f"http://127.0.0.1:{server.port}/v1/api"

        def calls() -> dict[str, Any]:
            s = requests.Session()
            out = {}
            for name, r in {
                "nan": s.get(base + "/tickle"),
                "bug": s.post(base + "/iserver/auth/status"),
                "api_error": s.get(base + "/portfolio/accounts"),
                "page": s.get(base + "/portfolio/DU1/positions/3"),
                "no_page": s.get(base + "/portfolio/DU1/positions/"),
                "params": s.get(base + "/iserver/marketdata/snapshot?conids=1&conids=2"),
                "json": s.post(base + "/iserver/marketdata/unsubscribe", json={"conid": 5}),
                "empty": s.post(base + "/iserver/marketdata/unsubscribe"),
                "bad_json": s.post(base + "/iserver/marketdata/unsubscribe", data=b"{"),
                "too_big": s.post(base + "/iserver/marketdata/unsubscribe",
                                  data=b" " * ((1 << 20) + 1)),
            }.items():
                out[name] = (r.status_code, r.json())
            return out

        try:
            return await asyncio.to_thread(calls)
        finally:
            await server.stop()
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()

    loop = asyncio.new_event_loop()  # not set as current: ib_async tests use their own
    try:
        out = loop.run_until_complete(main())
    finally:
        loop.close()
    assert out["nan"] == (500, {"error": "internal error", "statusCode": 500})
    assert out["bug"] == (500, {"error": "internal error", "statusCode": 500})
    assert out["api_error"] == (500, {"error": "Please query /accounts first",
                                      "statusCode": 500})
    assert out["page"] == (200, {"account": "DU1", "page": "3"})
    assert out["no_page"] == (200, {"account": "DU1", "page": None})
    assert out["params"] == (200, {"conids": "1,2", "fields": None})
    assert out["json"] == (200, {"body": {"conid": 5}})
    assert out["empty"] == (200, {"body": None})
    assert out["bad_json"][0] == 400 and "JSON" in out["bad_json"][1]["error"]
    assert out["too_big"][0] == 413 and out["too_big"][1]["statusCode"] == 413


def test_admin_app_alone_answers_status():
    class Admin:
        def status(self) -> Any:
            return {"ok": True}

        def disconnect(self) -> Any:
            return {"disconnected": 0}

        def reset(self, pause: str | None, restore: str | None) -> Any:
            return {"pause": pause, "restore": restore}

        def inject(self, fault: str, count: str | None) -> Any:
            return {fault: count}

    async def main() -> list[Any]:
        server = await HttpServer(build_admin_app(Admin()), "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{server.port}"
        try:
            return await asyncio.to_thread(lambda: [
                requests.get(base + "/status", timeout=5).json(),
                requests.post(base + "/faults/reset?pause=1", timeout=5).json(),
                requests.post(base + "/faults/pacing", timeout=5).json(),
            ])
        finally:
            await server.stop()

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(main()) == [
            {"ok": True}, {"pause": "1", "restore": None}, {"pacing": None}]
    finally:
        loop.close()
