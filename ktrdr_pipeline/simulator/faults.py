"""Fault injection: request faults consumed by the next historical requests, the
connection faults (every socket closed, IB's nightly reset), and trading outside the
calendar's sessions (:class:`OffCalendarTrading`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from ..domain import ib_rules
from .audit import AuditLog

#: The request faults, by the names tests and the admin interface use.
REQUEST_FAULTS = ("pacing", "stall", "error_322", "hmds_unknown")

#: A 162 as a non-English TWS may send it: the prefix translated as a Spanish TWS does
#: (wrighter/ib-scripts#1), the rest in words no loader can know (an illustration, not
#: IB's text). Loaders must neither take it for "no data" nor retry it forever.
MSG_HMDS_UNKNOWN = ("Mensaje de error de los servicios de datos de mercado históricos:"
                    "Infracción del ritmo de solicitudes de datos históricos")
#: How a nightly reset ends: 1102 "data maintained", or every socket closed.
RESET_ENDINGS = ("1102", "close")


@dataclass
class Faults:
    """Pending request faults; each counter is consumed by the next historical requests:
    ``pacing`` answers 162, ``stall`` never answers, ``error_322`` answers 322,
    ``hmds_unknown`` answers a 162 in words no loader knows (:data:`MSG_HMDS_UNKNOWN`)."""

    pacing: int = 0
    stall: int = 0
    error_322: int = 0
    hmds_unknown: int = 0

    def add(self, name: str, count: int = 1) -> int:
        """Queue ``count`` more faults of one kind; returns how many are now pending."""
        if name not in REQUEST_FAULTS:
            raise ValueError(f"unknown fault {name!r}; allowed: {', '.join(REQUEST_FAULTS)}")
        if count < 0:
            raise ValueError("count must be >= 0")
        setattr(self, name, getattr(self, name) + count)
        return getattr(self, name)

    def take(self, name: str) -> bool:
        n = getattr(self, name)
        if n > 0:
            setattr(self, name, n - 1)
            return True
        return False


class OffCalendarTrading:
    """Minutes in which an instrument trades although its calendar has no session there.

    IB's data is the truth and an exchange calendar may lag behind it (an unscheduled
    session, a halt moved by the exchange): with a span added here the market model serves
    bars of a minute and longer (below a day) for those minutes, whatever the request's
    ``useRTH``, as IB would. Spans inside a session change nothing. Instruments are named
    by symbol (``ES``: every ES future), local symbol (``ESH5``, ``EUR.USD``), pair
    (``EURUSD``) or contract id. Thread-safe: the admin adds, the market's worker reads.
    """

    def __init__(self) -> None:
        self._spans: dict[str, list[tuple[int, int]]] = {}
        self._lock = threading.Lock()

    def add(self, instrument: str, at: datetime, minutes: int = 1) -> list[tuple[int, int]]:
        """Trade ``instrument`` for ``minutes`` from ``at`` (timezone-aware, rounded down
        to its minute); returns the instrument's spans as [start, end) epoch seconds."""
        name = instrument.strip().upper()
        if not name:
            raise ValueError("name the instrument: a symbol, local symbol, pair or conId")
        if at.tzinfo is None:
            raise ValueError(f"{at.isoformat()} has no time zone: give one (e.g. Z)")
        if not 1 <= minutes <= 7 * 24 * 60:
            raise ValueError(f"minutes must be 1..{7 * 24 * 60}, not {minutes}")
        start = int(at.timestamp()) // 60 * 60
        with self._lock:
            spans = self._spans.setdefault(name, [])
            spans.append((start, start + 60 * minutes))
            spans.sort()
            return list(spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def spans_for(self, names: Iterable[str]) -> list[tuple[int, int]]:
        """The spans added under any of ``names`` (an instrument's names), sorted."""
        with self._lock:
            return sorted(s for n in {n.upper() for n in names} for s in self._spans.get(n, ()))

    def as_dict(self) -> dict[str, list[list[str]]]:
        with self._lock:
            return {n: [[datetime.fromtimestamp(a, UTC).isoformat(),
                         datetime.fromtimestamp(b, UTC).isoformat()] for a, b in v]
                    for n, v in self._spans.items()}


class Connection(Protocol):
    """What a connection fault needs of a client connection."""

    def error(self, req_id: int, code: int, message: str) -> None: ...

    def close(self) -> None: ...


class ConnectionFaults:
    """Faults that hit every connection at once.

    During a nightly reset the data farm is down: historical requests wait in
    :meth:`farm_available` until it is over.
    """

    def __init__(self, connections: Callable[[], Iterable[Connection]], audit: AuditLog):
        self._connections = connections
        self._audit = audit
        self._restored = asyncio.Event()
        self._restored.set()

    async def farm_available(self) -> None:
        await self._restored.wait()

    def disconnect_all(self) -> int:
        """Close every client connection now; returns how many there were."""
        connections = list(self._connections())
        for c in connections:
            c.close()
        self._audit.write(message="fault", outcome="disconnect_all", count=len(connections))
        return len(connections)

    async def nightly_reset(self, pause: float = 2.0, restore: str = "1102") -> None:
        """IB's nightly reset: 1100, requests held for ``pause`` seconds, then 1102
        (``restore='1102'``) or every socket closed (``restore='close'``)."""
        if restore not in RESET_ENDINGS:
            raise ValueError("restore must be '1102' or 'close'")
        self._audit.write(message="fault", outcome=f"reset {restore}", pause=pause)
        self._restored.clear()
        for c in list(self._connections()):
            c.error(-1, ib_rules.ERR_CONNECTIVITY_LOST, ib_rules.MSG_CONNECTIVITY_LOST)
        try:
            await asyncio.sleep(pause)
        finally:
            if restore == "close":
                self.disconnect_all()
            else:
                for c in list(self._connections()):
                    c.error(-1, ib_rules.ERR_RESTORED_DATA_MAINTAINED,
                            ib_rules.MSG_RESTORED_DATA_MAINTAINED)
            self._restored.set()
