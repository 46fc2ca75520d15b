"""The Client Portal Web API v1 simulator (``ktrdr_pipeline.simulator.portal``, served by
``ktrdr_pipeline.simulator.http_app`` on uvicorn)."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from ib_async import Contract

from ktrdr_pipeline.simulator.portal import ACCOUNTS_FIRST, PortalServer, start_portal
from ktrdr_pipeline.simulator.server import GatewayServer, GatewayThread

from .conftest import MARKET_OPEN, connect

#: A Saturday: every market is shut, so underlying prices (and Greeks, up to time decay)
#: stay put while the socket and the portal sample them a moment apart.
WEEKEND = datetime(2026, 11, 21, 15, 0, tzinfo=UTC)
ACCOUNT = "DU0000001"
GREEKS = {"delta": "7308", "gamma": "7309", "theta": "7310", "vega": "7311"}
FIELDS = "31,84,86,7308,7309,7310,7311,7633,7635,6008,55,6070,6457,6509"
META = {"conid", "conidEx", "_updated", "server_id"}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Portal:
    """A requests session bound to one running portal."""

    def __init__(self, gw: GatewayThread):
        self.gw = gw
        self.server: PortalServer = gw.server._portal
        self.base = self.server.base_url
        self.verify: Any = str(self.server.cert_path) if self.server.cert_path else True
        self.http = requests.Session()

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.get(self.base + path, verify=self.verify, timeout=5, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.post(self.base + path, verify=self.verify, timeout=5, **kwargs)

    def snapshot(self, conids: list[int], fields: str = FIELDS) -> list[dict[str, Any]]:
        r = self.get(
            "/iserver/marketdata/snapshot",
            params={"conids": ",".join(map(str, conids)), "fields": fields},
        )
        assert r.status_code == 200, r.text
        return r.json()

    def prime(self) -> None:
        assert self.get("/portfolio/accounts").status_code == 200
        assert self.get("/iserver/accounts").status_code == 200


@pytest.fixture(scope="module")
def plain_gw() -> Iterator[GatewayThread]:
    with GatewayThread(
        clock=MARKET_OPEN, latency="none", portal_port=0, portal_tls=False, tick_interval=0.2
    ) as gw:
        yield gw


@pytest.fixture(scope="module")
def tls_gw() -> Iterator[GatewayThread]:
    with GatewayThread(
        clock=WEEKEND, latency="none", portal_port=0, portal_tls=True, tick_interval=0.2
    ) as gw:
        yield gw


@pytest.fixture
def portal(plain_gw: GatewayThread) -> Iterator[Portal]:
    plain_gw.call(plain_gw.server._portal.reset_session)
    client = Portal(plain_gw)
    yield client
    client.http.close()


def option_positions(gw: GatewayThread) -> list[Any]:
    universe = gw.server.universe
    return [
        universe.instruments[p.con_id]
        for p in universe.positions
        if universe.instruments[p.con_id].sec_type == "OPT"
    ]


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes to the plain-HTTP portal; everything it answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # an incomplete request must end, not wait for more
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# -- transport --------------------------------------------------------------------------------
def test_tls_verifies_against_the_generated_certificate(tls_gw):
    server = tls_gw.server._portal
    assert server.tls and server.cert_path is not None and server.cert_path.exists()
    assert server.base_url == f"https://127.0.0.1:{tls_gw.server.portal_port}/v1/api"
    for host in ("127.0.0.1", "localhost"):
        url = f"https://{host}:{server.port}/v1/api/tickle"
        r = requests.post(url, verify=str(server.cert_path), timeout=5)
        assert r.status_code == 200 and r.json()["iserver"]["authStatus"]["authenticated"]
    # Default verification (system or certifi bundle) rejects the self-signed certificate.
    with pytest.raises(requests.exceptions.SSLError):
        requests.post(server.base_url + "/tickle", timeout=5)
    # The TLS port does not speak plain HTTP; the server survives the attempt.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{server.port}/v1/api/tickle", timeout=5)
    assert (
        requests.get(
            server.base_url + "/iserver/auth/status", verify=str(server.cert_path), timeout=5
        ).status_code
        == 200
    )


def test_plain_http_mode(portal):
    assert portal.base.startswith("http://127.0.0.1:")
    assert portal.server.cert_path is None and not portal.server.tls
    assert portal.get("/iserver/auth/status").json()["authenticated"] is True


def test_start_portal_directly_and_stop_removes_the_certificate():
    book = GatewayServer(clock=MARKET_OPEN).book

    async def main() -> tuple[int, Any]:
        server = await start_portal(book, "127.0.0.1", 0)
        try:
            r = await asyncio.to_thread(
                requests.get, server.base_url + "/tickle", verify=str(server.cert_path), timeout=5
            )
            cert = server.cert_path
            assert cert is not None and cert.exists()
        finally:
            await server.stop()
        return r.status_code, cert

    loop = asyncio.new_event_loop()  # not set as current: ib_async tests use their own
    try:
        status, cert = loop.run_until_complete(main())
    finally:
        loop.close()
    assert status == 200
    assert not cert.exists()


def test_keep_alive_json_bodies_and_http_1_0(portal):
    conn = http.client.HTTPConnection("127.0.0.1", portal.server.port, timeout=5)
    try:
        conn.request(
            "POST", "/v1/api/tickle", body=b'{"x": 1}', headers={"Content-Type": "application/json"}
        )
        first = conn.getresponse()
        # HTTP/1.1 connections persist by default: no "Connection" header, and never "close".
        assert first.status == 200 and first.getheader("Connection") is None
        assert not first.will_close
        assert json.loads(first.read())["collission"] is False
        sock = conn.sock
        # A chunked JSON body on the same connection.
        conn.putrequest("POST", "/v1/api/iserver/marketdata/unsubscribeall")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("Content-Type", "application/json")
        conn.endheaders()
        conn.send(b"2\r\n{}\r\n0\r\n\r\n")
        second = conn.getresponse()
        assert second.status == 200 and json.loads(second.read()) == {"unsubscribed": True}
        assert conn.sock is sock, "the connection was not kept alive"
        conn.request(
            "POST",
            "/v1/api/tickle",
            body=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        third = conn.getresponse()
        assert third.status == 200  # tickle ignores its body, like the real one
        third.read()
        conn.request("POST", "/v1/api/iserver/marketdata/unsubscribe", body=b"{not json")
        bad = conn.getresponse()
        assert bad.status == 400 and "JSON" in json.loads(bad.read())["error"]
        assert conn.sock is sock
    finally:
        conn.close()
    answer = raw_exchange(portal.server.port, b"GET /v1/api/tickle HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head
    assert json.loads(body)["iserver"]["authStatus"]["connected"] is True


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"THIS IS NOT HTTP\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET /v1/api/tickle HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"POST /v1/api/tickle HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"GET /v1/api/tickle HTTP/1.1\r\nX-Long: " + b"a" * 40_000 + b"\r\n\r\n",
        b"GET " + b"/x" * 20_000 + b" HTTP/1.1\r\n\r\n",
        b"GET /v1/api/tickle HTTP/9.9\r\n\r\n",
        b"POST /v1/api/tickle HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /v1/api/tickle HTTP/1.1\r\nContent-Length: 5\r\n",
    ],
)
def test_malformed_requests_get_400_and_the_server_keeps_serving(portal, request_bytes):
    """uvicorn (h11) answers what it cannot parse with its own plain-text 400 and closes the
    connection; a request cut off before its header ends (the client closed its side) gets
    no answer at all. Either way the server keeps serving."""
    answer = raw_exchange(portal.server.port, request_bytes)
    if request_bytes.endswith(b"Content-Length: 5\r\n"):
        assert answer == b""
    else:
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        assert status in (400, 505), answer[:200]
        if status == 505:  # reached the application: a JSON error body
            assert json.loads(body)["statusCode"] == status
    assert portal.post("/tickle").status_code == 200


def test_unknown_path_and_wrong_method(portal):
    r = portal.get("/no/such/thing")
    assert r.status_code == 404 and r.headers["Content-Type"].startswith("application/json")
    assert "error" in r.json()
    assert (
        requests.get(f"http://127.0.0.1:{portal.server.port}/elsewhere", timeout=5).status_code
        == 404
    )
    assert portal.post("/portfolio/accounts").status_code == 405


# -- session ----------------------------------------------------------------------------------
def test_tickle_and_auth_status(portal):
    before = time.time()
    assert portal.server.last_tickle is None or portal.server.last_tickle <= before
    body = portal.post("/tickle").json()
    assert re.fullmatch(r"[0-9a-f]{32}", body["session"])
    assert body["iserver"]["authStatus"] == {
        **body["iserver"]["authStatus"],
        "authenticated": True,
        "competing": False,
        "connected": True,
    }
    assert body["collission"] is False and body["userId"] == 1 and body["ssoExpires"] > 0
    assert before <= portal.server.last_tickle <= time.time()
    assert portal.get("/tickle").json()["session"] == body["session"]
    for call in (portal.get, portal.post):
        status = call("/iserver/auth/status").json()
        assert status["authenticated"] and status["connected"] and not status["competing"]
        assert status["message"] == "" and status["MAC"] and status["serverInfo"]


# -- accounts and positions -------------------------------------------------------------------
def test_positions_need_portfolio_accounts_first(portal):
    r = portal.get(f"/portfolio/{ACCOUNT}/positions/0")
    assert r.status_code == 500 and r.json()["error"] == ACCOUNTS_FIRST
    assert portal.get("/iserver/accounts").status_code == 200  # does not prime the portfolio
    assert portal.get(f"/portfolio/{ACCOUNT}/positions/0").status_code == 500
    [account] = portal.get("/portfolio/accounts").json()
    assert account["id"] == account["accountId"] == account["accountVan"] == ACCOUNT
    assert account["type"] == "DEMO" and account["currency"] == "USD"
    assert account["accountTitle"]
    assert portal.get(f"/portfolio/{ACCOUNT}/positions/0").status_code == 200


def test_positions_pages(portal, plain_gw):
    portal.prime()
    page0 = portal.get(f"/portfolio/{ACCOUNT}/positions/0").json()
    universe = plain_gw.server.universe
    assert len(page0) == 8
    assert [(p["conid"], p["position"]) for p in page0] == [
        (p.con_id, p.quantity) for p in universe.positions
    ]
    assert portal.get(f"/portfolio/{ACCOUNT}/positions/1").json() == []
    no_page = portal.get(f"/portfolio/{ACCOUNT}/positions").json()  # page 0
    assert [p["conid"] for p in no_page] == [p["conid"] for p in page0]
    assert {p["assetClass"] for p in page0} == {"STK", "FUT", "OPT"}
    keys = {
        "acctId",
        "conid",
        "contractDesc",
        "position",
        "mktPrice",
        "mktValue",
        "currency",
        "avgCost",
        "avgPrice",
        "unrealizedPnl",
        "realizedPnl",
        "assetClass",
        "expiry",
        "putOrCall",
        "strike",
        "multiplier",
        "undConid",
        "ticker",
    }
    for p in page0:
        assert keys <= p.keys(), keys - p.keys()
        inst = universe.instruments[p["conid"]]
        mult = inst.multiplier_value
        assert p["acctId"] == ACCOUNT and p["currency"] == "USD"
        assert p["mktValue"] == pytest.approx(p["mktPrice"] * p["position"] * mult, abs=0.02)
        assert p["avgPrice"] == pytest.approx(p["avgCost"] / mult)
        assert p["unrealizedPnl"] == pytest.approx(
            p["mktValue"] - p["avgCost"] * p["position"], abs=0.02
        )
        if p["assetClass"] == "OPT":
            und = universe.by_symbol(inst.underlying, "STK")[0]
            assert p["putOrCall"] == inst.right and p["strike"] == inst.strike
            assert p["expiry"] == inst.expiry and p["multiplier"] == 100.0
            assert p["undConid"] == und.con_id and p["ticker"] == und.symbol
            assert inst.local_symbol in p["contractDesc"]
        elif p["assetClass"] == "STK":
            assert p["putOrCall"] is None and p["expiry"] is None and p["undConid"] == 0
    r = portal.get("/portfolio/DU9999999/positions/0")
    assert r.status_code == 404 and "DU9999999" in r.json()["error"]
    assert portal.get(f"/portfolio/{ACCOUNT}/positions/-1").status_code == 400
    assert portal.get(f"/portfolio/{ACCOUNT}/positions/x").status_code == 400


# -- market data ------------------------------------------------------------------------------
def test_iserver_accounts_then_snapshot_pre_flight(portal, plain_gw):
    conids = [265598, option_positions(plain_gw)[0].con_id]
    r = portal.get("/iserver/marketdata/snapshot", params={"conids": "265598", "fields": "31"})
    assert r.status_code == 500 and r.json()["error"] == ACCOUNTS_FIRST
    accounts = portal.get("/iserver/accounts").json()
    assert accounts["accounts"] == [ACCOUNT] and accounts["selectedAccount"] == ACCOUNT

    first = portal.snapshot(conids)
    assert [o["conid"] for o in first] == conids
    for o in first:
        assert set(o) == META, o  # pre-flight: the line opens, no values yet
        assert o["conidEx"] == str(o["conid"]) and isinstance(o["_updated"], int)
    second = portal.snapshot(conids)
    stock, option = second
    assert {"31", "84", "86", "7635", "55", "6070", "6008", "6509"} <= stock.keys()
    assert stock["55"] == "AAPL" and stock["6070"] == "STK" and stock["6008"] == "265598"
    assert not {"7308", "7309", "7310", "7311", "7633", "6457"} & stock.keys()
    assert float(stock["84"]) < float(stock["31"]) < float(stock["86"])
    assert re.fullmatch(r"\d+\.\d{1,2}", stock["31"]), stock["31"]
    assert {*GREEKS.values(), "7633", "6457"} <= option.keys()
    assert option["6070"] == "OPT" and option["6457"] == "265598"
    assert re.fullmatch(r"\d+\.\d%", option["7633"])
    assert all(isinstance(v, str) for k, v in option.items() if k.isdigit())
    # Only the requested fields come back.
    [only] = portal.snapshot([265598], fields="31")
    assert set(only) == META | {"31"}
    # Unsubscribing closes the line: the next snapshot is a pre-flight again.
    assert portal.post("/iserver/marketdata/unsubscribe", json={"conid": 265598}).json() == {
        "success": True
    }
    assert set(portal.snapshot([265598])[0]) == META
    assert portal.get("/iserver/marketdata/unsubscribeall").json() == {"unsubscribed": True}
    assert set(portal.snapshot(conids)[1]) == META
    # Bad input.
    [unknown] = portal.snapshot([1])
    assert "error" in unknown and not {"31", "84"} & unknown.keys()
    assert portal.get("/iserver/marketdata/snapshot", params={"conids": "abc"}).status_code == 400
    assert portal.get("/iserver/marketdata/snapshot").status_code == 400


def test_portal_greeks_equal_the_account_book_at_the_same_instant(portal, plain_gw):
    """The market is open (prices move every second): ``_updated`` is the simulator-clock
    instant of the values, so the book recomputed at that instant must agree exactly."""
    portal.prime()
    options = option_positions(plain_gw)
    assert len(options) == 4
    conids = [o.con_id for o in options]
    portal.snapshot(conids)
    book, server = plain_gw.server.book, plain_gw.server
    plain_gw.call(book.clock.shift, 1.1)  # let the underlying prices move between calls
    before = book.clock.now()
    answer = portal.snapshot(conids)
    after = book.clock.now()
    for obj, inst in zip(answer, options, strict=True):
        at = EPOCH + timedelta(milliseconds=obj["_updated"])
        # the instant of this snapshot (stamped in whole milliseconds)
        assert before - timedelta(milliseconds=1) <= at <= after
        g = plain_gw.call(server.compute(book.greeks, inst, at))
        for name, fid in GREEKS.items():
            assert float(obj[fid]) == pytest.approx(getattr(g, name), rel=1e-9), name
        assert float(obj["31"]) == pytest.approx(g.price, rel=1e-8)
        assert obj["7633"] == f"{g.implied_vol * 100:.1f}%"
        assert obj["6457"] == str(book.underlying_of(inst).con_id)


def test_socket_and_portal_report_the_same_greeks(tls_gw):
    inst = option_positions(tls_gw)[0]
    ib = connect(tls_gw)
    try:
        ticker = ib.reqMktData(Contract(conId=inst.con_id, exchange="SMART"), "", False, False)
        ib.sleep(1)
        socket_greeks = ticker.modelGreeks
        ib.cancelMktData(ticker.contract)
    finally:
        ib.disconnect()
    assert socket_greeks is not None, "no tickOptionComputation from the socket API"
    portal = Portal(tls_gw)
    portal.prime()
    portal.snapshot([inst.con_id])
    [obj] = portal.snapshot([inst.con_id])
    for name, fid in GREEKS.items():
        assert float(obj[fid]) == pytest.approx(getattr(socket_greeks, name), rel=1e-3), name
    assert float(obj["7633"].rstrip("%")) / 100 == pytest.approx(socket_greeks.impliedVol, abs=6e-4)
    assert float(obj["31"]) == pytest.approx(socket_greeks.optPrice, rel=1e-3)
