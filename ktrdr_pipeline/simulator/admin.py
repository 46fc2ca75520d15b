"""The simulator's admin interface: fault injection over HTTP, loopback only.

Endpoints (all answer JSON)::

    GET  /status                              clients, open requests, pending faults
    POST /faults/disconnect                   close every client connection now
    POST /faults/reset?pause=2&restore=1102   nightly reset: 1100, pause, 1102 or 'close'
    POST /faults/pacing?count=N               answer the next N historical requests with 162
    POST /faults/stall?count=N                never answer the next N historical requests
    POST /faults/error322?count=N             fail the next N historical requests with 322
    POST /faults/hmds_unknown?count=N         answer the next N with a 162 no loader knows
    POST /faults/outside_sessions?symbol=ES&at=2025-01-11T15:00:00Z&minutes=60
                                              trade ES for 60 minutes from ``at`` although
                                              its calendar has no session then (bars of
                                              1 min to 1 day served there); DELETE clears

Example: ``curl -X POST 'http://127.0.0.1:PORT/faults/pacing?count=3'``.

The admin works on :class:`AdminControls`, the few handles of the gateway it needs; the
HTTP side is :func:`ktrdr_pipeline.simulator.http_app.build_admin_app`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .clock import SimClock
from .faults import RESET_ENDINGS, Faults, OffCalendarTrading
from .http_app import ApiError, build_admin_app
from .http_server import HttpServer

log = logging.getLogger(__name__)

#: Admin fault names and the request faults they queue.
FAULT_COUNTERS = {"pacing": "pacing", "stall": "stall", "error322": "error_322",
                  "hmds_unknown": "hmds_unknown"}


@dataclass(frozen=True)
class AdminControls:
    """What the admin interface may see and do of a running gateway."""

    clients: Callable[[], list[int]]
    open_requests: Callable[[], int]
    faults: Faults
    clock: SimClock
    disconnect_all: Callable[[], int]
    nightly_reset: Callable[[float, str], Awaitable[None]]
    off_calendar: OffCalendarTrading | None = None


def _count(text: str | None) -> int:
    try:
        value = int(text if text is not None else "1")
    except ValueError:
        raise ApiError(400, f"count must be an integer, not {text[:20]!r}") from None
    if value < 0:
        raise ApiError(400, "count must be >= 0")
    return value


class Admin:
    """The admin endpoints' behaviour (see the module docstring)."""

    def __init__(self, controls: AdminControls):
        self.controls = controls
        self._resets: set[asyncio.Task[None]] = set()

    def status(self) -> dict[str, Any]:
        c = self.controls
        return {
            "clients": c.clients(),
            "open_historical_requests": c.open_requests(),
            "faults": vars(c.faults),
            "outside_sessions": c.off_calendar.as_dict() if c.off_calendar else {},
            "clock": c.clock.now().isoformat(),
        }

    def disconnect(self) -> dict[str, Any]:
        return {"disconnected": self.controls.disconnect_all()}

    def reset(self, pause: str | None, restore: str | None) -> dict[str, Any]:
        """Start a nightly reset in the background; answers at once."""
        restore = restore if restore is not None else "1102"
        try:
            seconds = float(pause if pause is not None else "2")
        except ValueError:
            raise ApiError(400, f"pause must be a number, not {pause[:20]!r}") from None
        if restore not in RESET_ENDINGS or not 0 <= seconds < math.inf:
            raise ApiError(400, "restore must be 1102 or close, pause a finite number >= 0")
        task = asyncio.get_running_loop().create_task(self.controls.nightly_reset(seconds, restore))
        self._resets.add(task)
        task.add_done_callback(self._resets.discard)
        return {"reset": restore, "pause": seconds}

    def outside_sessions(self, symbol: str | None, at: str | None,
                         minutes: str | None) -> dict[str, Any]:
        """Make ``symbol`` trade ``minutes`` (default 1) from ``at`` (ISO 8601 with a time
        zone) outside its calendar's sessions; answers the instrument's spans."""
        off = self.controls.off_calendar
        if off is None:
            raise ApiError(404, "this gateway has no off-calendar trading")
        if not symbol or not at:
            raise ApiError(400, "give symbol (e.g. ES, EURUSD, AAPL) and at (ISO 8601 with a "
                                "time zone, e.g. 2025-01-11T15:00:00Z)")
        try:
            when = datetime.fromisoformat(at.replace("Z", "+00:00"))
            off.add(symbol, when, int(minutes if minutes is not None else "1"))
        except ValueError as exc:
            raise ApiError(400, f"{exc}") from None
        log.info("fault: %s trades outside its sessions from %s", symbol, when.isoformat())
        return {"outside_sessions": off.as_dict()}

    def clear_outside_sessions(self) -> dict[str, Any]:
        if self.controls.off_calendar is not None:
            self.controls.off_calendar.clear()
        return {"outside_sessions": {}}

    def inject(self, fault: str, count: str | None) -> dict[str, Any]:
        """Queue ``count`` (default 1) faults; answers how many of that kind are pending."""
        if fault not in FAULT_COUNTERS:
            raise ApiError(404, f"unknown endpoint /faults/{fault}")
        return {fault: self.controls.faults.add(FAULT_COUNTERS[fault], _count(count))}


async def start_admin(controls: AdminControls, port: int) -> HttpServer:
    """Serve the admin interface on 127.0.0.1 only, whatever host the gateway uses."""
    return await HttpServer(build_admin_app(Admin(controls)), "127.0.0.1", port,
                            name="admin interface").start()
