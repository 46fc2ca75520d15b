"""Shared fixtures: an in-process gateway simulator and ib_async clients connected to it."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from ib_async import IB

from ktrdr_pipeline.simulator.protocol import encode
from ktrdr_pipeline.simulator.server import GatewayThread

#: A Wednesday, 10:00 US/Eastern: NYSE, FX and CME are all open.
MARKET_OPEN = datetime(2026, 11, 18, 15, 0, tzinfo=UTC)

_client_ids = itertools.count(100)


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture
def gateway(audit_path: Path) -> Iterator[GatewayThread]:
    with GatewayThread(clock=MARKET_OPEN, latency="none", audit_log=audit_path,
                       tick_interval=0.2, admin_port=0) as gw:
        yield gw


def read_audit(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ErrorLog:
    """Collects (reqId, code, message) from an IB client's errorEvent."""

    def __init__(self, ib: IB):
        self.items: list[tuple[int, int, str]] = []
        ib.errorEvent += self._on_error

    def _on_error(self, req_id, code, message, contract) -> None:
        self.items.append((req_id, code, message))

    def codes(self) -> list[int]:
        return [c for _, c, _ in self.items]


def wait_until(predicate: Callable[[], object], what: str, deadline: float = 30.0,
               sleep: Callable[[float], object] = time.sleep) -> None:
    """Wait for a state, not for a time: poll ``predicate`` until it is true and fail with
    ``what`` after ``deadline`` seconds. Pass ``sleep=ib.sleep`` to keep an ib_async
    client's loop running meanwhile."""
    give_up = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"not reached within {deadline:g} s: {what}")
        sleep(0.02)


def connect(gw: GatewayThread, client_id: int | None = None) -> IB:
    ib = IB()
    ib.connect("127.0.0.1", gw.port, clientId=client_id or next(_client_ids), timeout=5)
    return ib


@pytest.fixture
def ib(gateway: GatewayThread) -> Iterator[IB]:
    client = connect(gateway)
    yield client
    client.disconnect()


class RawClient:
    """A minimal TWS-protocol client over a plain socket, for malformed input and load."""

    def __init__(self, port: int, client_id: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(b"API\0" + struct.pack(">I", 9) + b"v157..178")
        self.read()  # server version, connection time
        self.send(71, 2, client_id, "")
        self.buffer = b""

    def send(self, *fields: object) -> None:
        self.sock.sendall(encode(fields))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> list[str]:
        buf = getattr(self, "buffer", b"")
        while len(buf) < 4:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        size = struct.unpack(">I", buf[:4])[0]
        while len(buf) < 4 + size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        msg, self.buffer = buf[4:4 + size], buf[4 + size:]
        return msg.decode().split("\0")[:-1]

    def read_until(self, msg_id: str, req_id: str | None = None) -> list[str]:
        while True:
            fields = self.read()
            if fields[0] == msg_id and (req_id is None or fields[1] == req_id):
                return fields
            if fields[0] == "4" and req_id is not None and fields[2] == req_id:
                return fields

    def close(self) -> None:
        self.sock.close()


def run(coro):
    return asyncio.get_event_loop().run_until_complete(coro)
