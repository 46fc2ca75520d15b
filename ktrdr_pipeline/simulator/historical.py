"""The simulated historical data farm (IB's HMDS): bars and head timestamps.

Each request passes, in IB's order: the nightly reset (held until it is over), injected
faults, validation, contract resolution, pacing, the longest duration per bar size and the
"no data" cases; then the market model answers, after the latency model's delay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from ..domain import ib_rules
from . import rules
from .account import price_text
from .audit import AuditLog
from .clock import SimClock
from .faults import MSG_HMDS_UNKNOWN, ConnectionFaults, Faults
from .latency import LatencyModel, delay
from .market import C, H, L, MarketModel, N, O, T, V, W
from .protocol import describe, format_bar_time
from .rules import RequestError
from .universe import Instrument, Universe

Compute = Callable[..., Awaitable[Any]]
#: Sends a warning (code, text) for the request being answered.
Warn = Callable[[int, str], None]


@dataclass(frozen=True)
class BarsRequest:
    """A reqHistoricalData request, its fields as the client sent them."""

    contract: dict[str, str]
    include_expired: bool
    end: str
    bar_size: str
    duration: str
    use_rth: str
    what_to_show: str
    format_date: str


@dataclass(frozen=True)
class HeadTimestampRequest:
    """A reqHeadTimeStamp request, its fields as the client sent them."""

    contract: dict[str, str]
    include_expired: bool
    use_rth: str
    what_to_show: str
    format_date: str


def transform(block: np.ndarray, what: str, inst: Instrument) -> np.ndarray:
    """Derive the requested data type from the traded (or FX mid) prices."""
    if what in ("TRADES", "ADJUSTED_LAST"):
        return block
    out = block.copy()
    if what in ("HISTORICAL_VOLATILITY", "OPTION_IMPLIED_VOLATILITY"):
        base = inst.annual_vol * (1.1 if what.startswith("OPTION") else 1.0)
        level = base * (1 + 0.2 * np.sin(block[:, T] / 86400 / 20))
        out[:, O] = out[:, H] = out[:, L] = out[:, C] = np.round(level, 6)
    else:
        tick = inst.tick
        shift = {"BID": -tick, "ASK": tick}.get(what, 0.0)
        for col in (O, H, L, C):
            out[:, col] = np.round(block[:, col] + shift, 10)
        if what == "BID_ASK":
            out[:, O], out[:, C] = block[:, O] - tick, block[:, C] + tick
            out[:, H], out[:, L] = block[:, H] + tick, block[:, L] - tick
    out[:, V] = -1
    out[:, W] = -1
    out[:, N] = -1
    return out


def bar_fields(block: np.ndarray, fmt: str, tz: ZoneInfo, daily: bool) -> list[object]:
    """The per-bar fields of a historicalData message (time, OHLC, volume, WAP, count)."""
    fields: list[object] = []
    for r in block:
        t = datetime.fromtimestamp(float(r[T]), UTC)
        fields += [format_bar_time(t, fmt, tz, daily), price_text(r[O]), price_text(r[H]),
                   price_text(r[L]), price_text(r[C]), price_text(r[V]), price_text(r[W]),
                   int(r[N])]
    return fields


class HistoricalService:
    """Answers historical requests from the market model under IB's rules.

    ``compute(fn, *args)`` runs market-model work off the event loop. Requests are owned
    by a connection (``owner``, any hashable id) so its open requests end with it.
    """

    def __init__(self, *, market: MarketModel, universe: Universe, clock: SimClock,
                 audit: AuditLog, latency: LatencyModel, faults: Faults,
                 connectivity: ConnectionFaults, pacing: rules.PacingGuard,
                 compute: Compute):
        self.market = market
        self.universe = universe
        self.clock = clock
        self.audit = audit
        self.latency = latency
        self.faults = faults
        self.connectivity = connectivity
        self.pacing = pacing
        self.open_requests = rules.OpenRequests()
        self._compute = compute
        self._throttle = latency.throttle()

    # -- bars ------------------------------------------------------------------------------
    async def bars(self, owner: int, client_id: int | None, req_id: int,
                   req: BarsRequest, warn: Warn | None = None) -> list[object]:
        """The historicalData message (17) answering ``req``; raises :class:`RequestError`.
        ``warn(code, text)`` sends a warning for the request before its answer (2174)."""
        self.audit.write(client_id=client_id, req_id=req_id, message="reqHistoricalData",
                         contract=describe(req.contract), bar_size=req.bar_size,
                         duration=req.duration, end=req.end, what_to_show=req.what_to_show,
                         use_rth=req.use_rth, outcome="request")
        self.open_requests.claim(owner, "hist", req_id)
        try:
            return await self._bars(client_id, req_id, req, warn)
        finally:
            self.open_requests.release(owner, "hist", req_id)

    async def _bars(self, client_id: int | None, req_id: int, req: BarsRequest,
                    warn: Warn | None = None) -> list[object]:
        await self.connectivity.farm_available()
        if self.faults.take("stall"):
            self.audit.write(client_id=client_id, req_id=req_id, message="fault",
                             outcome="stalled")
            await asyncio.Event().wait()  # never answered; ends on cancel or disconnect
        if self.faults.take("pacing"):
            raise RequestError(ib_rules.ERR_HMDS, ib_rules.MSG_PACING_VIOLATION)
        if self.faults.take("error_322"):
            raise RequestError(ib_rules.ERR_PROCESSING, ib_rules.MSG_PROCESSING)
        if self.faults.take("hmds_unknown"):
            raise RequestError(ib_rules.ERR_HMDS, MSG_HMDS_UNKNOWN)
        what, bar_size = req.what_to_show, req.bar_size
        duration = rules.check_bars_request(bar_size, req.duration, what, req.use_rth,
                                            req.format_date)
        now = self.clock.now()
        rules.check_end_allowed(req.contract, req.end)
        end = rules.parse_end_datetime(req.end, now)
        if warn is not None and rules.end_without_zone(req.end):
            warn(ib_rules.WARN_END_WITHOUT_ZONE, ib_rules.MSG_END_WITHOUT_ZONE)
        inst = rules.resolve_contract(self.universe, req.contract, req.include_expired, now)
        if ib_rules.is_small_bar(bar_size):
            self.pacing.check(rules.bars_paced(inst, req.contract, what, req.end, req.duration,
                                               bar_size, req.use_rth))
        rules.check_max_duration(duration, bar_size)
        if not rules.has_bars(inst, what):
            raise rules.no_data(inst, what, bar_size)
        start, end = rules.bars_window(inst.profile, end, now, duration, bar_size,
                                       req.use_rth == "1")
        if start >= end:
            raise rules.no_data(inst, what)
        block = await self._compute(self.market.bars, inst, bar_size, start, end,
                                    req.use_rth == "1", now, what in ("TRADES", "ADJUSTED_LAST"))
        if len(block) == 0:
            raise rules.no_data(inst, what)
        block = transform(block, what, inst)
        if self._throttle is not None and not ib_rules.is_small_bar(bar_size):
            async with self._throttle:
                await delay(self.latency.bars_delay(len(block)))
        else:
            await delay(self.latency.bars_delay(len(block)))
        daily = ib_rules.is_daily_or_larger(bar_size)
        tz = ZoneInfo(inst.profile.tz)
        fmt = req.format_date
        fields: list[object] = [17, req_id, format_bar_time(start, "1", tz, False),
                                format_bar_time(end, "1", tz, False), len(block)]
        # Formatting thousands of bars takes tens of milliseconds: done in a thread, so the
        # event loop keeps reading other clients' requests meanwhile (several big answers
        # formatted back to back on the loop delayed reading requests by up to 0.9 s, which
        # the time-scaled pacing benchmark saw as violations: benchmarks/probe_pacing_lag.py)
        fields += await asyncio.to_thread(bar_fields, block, fmt, tz, daily)
        self.audit.write(client_id=client_id, req_id=req_id, message="historicalData",
                         con_id=inst.con_id, bar_size=bar_size, outcome="bars", bars=len(block))
        return fields

    # -- head timestamps -------------------------------------------------------------------
    async def head_timestamp(self, owner: int, client_id: int | None, req_id: int,
                             req: HeadTimestampRequest) -> list[object]:
        """The headTimestamp message (88) answering ``req``. The request stays open until
        the client cancels it (:meth:`cancel_head_timestamp`), as at IB."""
        self.audit.write(client_id=client_id, req_id=req_id, message="reqHeadTimeStamp",
                         contract=describe(req.contract), what_to_show=req.what_to_show,
                         use_rth=req.use_rth, outcome="request")
        self.open_requests.claim(owner, "head", req_id)
        try:
            return await self._head_timestamp(client_id, req_id, req)
        except BaseException:
            self.open_requests.release(owner, "head", req_id)
            raise

    def cancel_head_timestamp(self, owner: int, req_id: int) -> None:
        self.open_requests.release(owner, "head", req_id)

    async def _head_timestamp(self, client_id: int | None, req_id: int,
                              req: HeadTimestampRequest) -> list[object]:
        await self.connectivity.farm_available()
        what = req.what_to_show
        inst = rules.resolve_contract(self.universe, req.contract, req.include_expired,
                                      self.clock.now())
        self.pacing.check(rules.head_timestamp_paced(inst, req.contract, what, req.use_rth))
        rules.check_what_to_show(what)
        if not rules.has_head_timestamp(inst, what):
            raise rules.no_data(inst, what)
        await delay(self.latency.lookup_s)
        first = self.market.head_time(inst, req.use_rth == "1")
        value = str(int(first.timestamp())) if req.format_date == "2" else first.strftime(
            "%Y%m%d-%H:%M:%S")
        self.audit.write(client_id=client_id, req_id=req_id, message="headTimestamp",
                         con_id=inst.con_id, outcome="ok", value=value)
        return [88, req_id, value]
