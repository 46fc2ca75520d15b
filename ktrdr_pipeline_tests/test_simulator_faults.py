"""Fault injection, from tests and from the loopback admin interface."""

from __future__ import annotations

import json
import time
import urllib.request

from ib_async import Stock

from ktrdr_pipeline.domain import ib_rules

from .conftest import ErrorLog, connect, read_audit, wait_until

AAPL = Stock("AAPL", "SMART", "USD")
END = "20261117 16:00:00 US/Eastern"


def _bars(ib, timeout: float = 5):
    return ib.reqHistoricalData(AAPL, END, "1 D", "1 hour", "TRADES", True, 2, timeout=timeout)


def _admin(gateway, method: str, path: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{gateway.server.admin_port}{path}",
                                 method=method)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def _wait_disconnected(*clients, timeout: float = 5) -> None:
    deadline = time.time() + timeout
    while any(c.isConnected() for c in clients) and time.time() < deadline:
        try:
            clients[0].sleep(0.05)
        except ConnectionError:  # ib_async raises from sleep when its socket closes
            pass


def test_disconnect_all_closes_every_client(gateway):
    a, b = connect(gateway), connect(gateway)
    try:
        assert gateway.disconnect_all() == 2
        _wait_disconnected(a, b)
        assert not a.isConnected() and not b.isConnected()
        c = connect(gateway)  # the gateway keeps serving
        assert len(_bars(c)) == 7
        c.disconnect()
    finally:
        a.disconnect()
        b.disconnect()


def test_nightly_reset_with_data_maintained(gateway, ib):
    errors = ErrorLog(ib)
    done = gateway.reset(pause=0.5, restore="1102")
    wait_until(lambda: ib_rules.ERR_CONNECTIVITY_LOST in errors.codes(), "the reset's 1100",
               sleep=ib.sleep)
    bars = _bars(ib, timeout=30)  # held during the reset, answered after it
    assert len(bars) == 7
    # held, not answered during the pause: the 1102 that ends the reset came first
    assert ib_rules.ERR_RESTORED_DATA_MAINTAINED in errors.codes()
    done.result(30)
    assert ib_rules.ERR_CONNECTIVITY_LOST in errors.codes()
    assert ib.isConnected()


def test_nightly_reset_ending_in_a_closed_socket(gateway, ib):
    errors = ErrorLog(ib)
    gateway.reset(pause=0.2, restore="close").result(5)
    _wait_disconnected(ib)
    assert not ib.isConnected()
    assert ib_rules.ERR_CONNECTIVITY_LOST in errors.codes()


def test_injected_pacing_violations(gateway, ib):
    errors = ErrorLog(ib)
    gateway.inject("pacing", 2)
    assert len(_bars(ib)) == 0
    assert len(_bars(ib)) == 0
    assert len(_bars(ib)) == 7
    assert [m for _, c, m in errors.items if c == 162] == [ib_rules.MSG_PACING_VIOLATION] * 2


def test_injected_322_errors(gateway, ib):
    errors = ErrorLog(ib)
    gateway.inject("error_322", 1)
    assert len(_bars(ib)) == 0
    assert len(_bars(ib)) == 7
    assert errors.codes().count(ib_rules.ERR_PROCESSING) == 1


def test_stalled_request_is_never_answered(gateway, ib, audit_path):
    gateway.inject("stall", 1)
    assert len(_bars(ib, timeout=0.7)) == 0  # ib_async gave up waiting
    assert len(_bars(ib)) == 7
    audit = read_audit(audit_path)
    stalled = [e["req_id"] for e in audit if e.get("outcome") == "stalled"]
    assert len(stalled) == 1
    # never answered: no bars, no error, until ib_async cancelled it (then IB's 162)
    assert [e["outcome"] for e in audit if e.get("req_id") == stalled[0]] == [
        "request", "stalled", "cancelled", "error 162"]


def test_admin_interface(gateway, ib):
    errors = ErrorLog(ib)
    status = _admin(gateway, "GET", "/status")
    assert status["clients"] == [ib.client.clientId]
    assert _admin(gateway, "POST", "/faults/pacing?count=1") == {"pacing": 1}
    assert len(_bars(ib)) == 0
    assert _admin(gateway, "POST", "/faults/error322?count=1") == {"error322": 1}
    assert len(_bars(ib)) == 0
    assert errors.codes().count(162) == 1 and errors.codes().count(322) == 1
    _admin(gateway, "POST", "/faults/reset?pause=0.2&restore=1102")
    wait_until(lambda: 1100 in errors.codes() and 1102 in errors.codes(),
               "the reset's 1100 and 1102", sleep=ib.sleep)
    assert _admin(gateway, "POST", "/faults/disconnect") == {"disconnected": 1}
    try:
        _admin(gateway, "POST", "/faults/nope")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    else:
        raise AssertionError("unknown endpoint accepted")


def test_admin_interface_binds_loopback_only(gateway):
    srv = gateway.server._admin
    assert all(s.getsockname()[0] == "127.0.0.1" for s in srv.sockets)
