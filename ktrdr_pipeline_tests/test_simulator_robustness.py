"""The gateway survives bad clients, stays fast, and holds steady memory."""

from __future__ import annotations

import gc
import socket
import struct
import tracemalloc

import pytest
from ib_async import Stock

from ktrdr_pipeline.simulator.protocol import MAX_FRAME_BYTES, encode

from .conftest import RawClient, connect, wait_until

AAPL_C12 = ["265598", "AAPL", "STK", "", "0", "", "", "SMART", "", "USD", "", ""]


def _hist(raw: RawClient, req_id: int, end: str, bar: str = "1 min", duration: str = "1 D"):
    raw.send(20, req_id, *AAPL_C12, 0, end, bar, duration, 1, "TRADES", 2, 0, "")


def test_malformed_frames_do_not_hurt_other_clients(gateway, ib):
    bad = RawClient(gateway.port, 91)
    bad.send("not-a-number", "x")  # non-numeric message id: ignored
    bad.send(20, "abc")  # truncated historical request: ignored
    bad.send_bytes(struct.pack(">I", 5) + b"\xff\xfe\x00\x00\x00")  # invalid UTF-8
    bad.send(49, 1)  # still served after all that
    assert bad.read_until("49")[0] == "49"
    bad.send_bytes(struct.pack(">I", MAX_FRAME_BYTES + 1))  # absurd length: closed
    with pytest.raises((ConnectionError, OSError)):
        for _ in range(50):
            bad.read()
    # garbage instead of the API greeting
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert sock.recv(100) == b""
    sock.close()
    bars = ib.reqHistoricalData(Stock("AAPL", "SMART", "USD"), "20261117 16:00:00 US/Eastern",
                                "1 D", "1 hour", "TRADES", True, 2)
    assert len(bars) == 7


def test_client_disconnecting_mid_request(gateway, ib):
    for i in range(5):
        raw = RawClient(gateway.port, 200 + i)
        gateway.inject("stall", 1)
        _hist(raw, 1, "20261117 16:00:00 US/Eastern")
        _hist(raw, 2, "20261116 16:00:00 US/Eastern")
        raw.close()  # gone with requests in flight
    wait_until(lambda: gateway.call(lambda: len(gateway.server.open_requests)) == 0,
               "the gone clients' open requests are released")
    assert len(ib.reqHistoricalData(Stock("AAPL", "SMART", "USD"), "", "1 D", "1 min",
                                    "TRADES", True, 2)) > 0


def test_one_day_of_one_minute_bars_is_one_full_session(gateway):
    """Each day answers with the session's 390 bars (how fast: benchmarks/bench_gateway.py,
    target a median under 20 ms)."""
    raw = RawClient(gateway.port, 92)
    try:
        for i, day in enumerate(("20261110", "20261111", "20261112", "20261113", "20261116")):
            _hist(raw, i + 1, f"{day} 16:00:00 US/Eastern")
            fields = raw.read_until("17", str(i + 1))
            assert fields[4] == "390"
    finally:
        raw.close()


@pytest.mark.slow
def test_memory_is_steady_over_ten_thousand_requests(gateway):
    """10,000 historical requests over many sessions: memory stops growing once the
    bounded caches are full."""
    raw = RawClient(gateway.port, 93)
    contracts = [["265598", "AAPL"], ["272093", "MSFT"], ["756733", "SPY"], ["4815747", "NVDA"]]

    def burst(start: int, count: int) -> None:
        for k in range(start, start + count):
            con, sym = contracts[k % 4]
            day = 1 + (k // 4) % 600  # walk across ~600 sessions
            end = f"{2024 + day // 300}{(day % 12) + 1:02d}{(day % 27) + 1:02d} 16:00:00 UTC"
            raw.send(20, k, con, sym, "STK", "", "0", "", "", "SMART", "", "USD", "", "",
                     0, end, "1 hour", "1 D", 1, "TRADES", 2, 0, "")
            if k % 50 == 49:  # keep fewer than 50 open
                _drain(raw, k)

    def _drain(raw: RawClient, last: int) -> None:
        while True:
            f = raw.read()
            if f[0] == "17" and f[1] == str(last):
                return
            if f[0] == "4" and f[2] == str(last):
                return

    try:
        burst(0, 2500)
        gc.collect()
        tracemalloc.start()
        burst(2500, 2500)
        gc.collect()
        first, _ = tracemalloc.get_traced_memory()
        burst(5000, 5000)
        gc.collect()
        second, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert second - first < 5 * 1024 * 1024, (first, second)
    finally:
        raw.close()


def test_many_clients_at_once(gateway):
    clients = [connect(gateway) for _ in range(5)]
    try:
        ids = {c.client.clientId for c in clients}
        assert len(ids) == 5
        assert sorted(gateway.call(lambda: sorted(gateway.server.clients))) == sorted(ids)
    finally:
        for c in clients:
            c.disconnect()


def test_encode_round_trip():
    frame = encode([20, 1, "AAPL", 1.5, True, None])
    size = struct.unpack(">I", frame[:4])[0]
    assert frame[4:].decode().split("\0")[:-1] == ["20", "1", "AAPL", "1.5", "1", ""]
    assert size == len(frame) - 4
