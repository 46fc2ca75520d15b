"""The IB Gateway simulator's socket server.

Speaks the TWS API socket protocol to unmodified clients (ib_async), serves the market
model, enforces IB's historical-data rules from :mod:`ktrdr_pipeline.ib.limits`, and takes
fault injections from tests or from the loopback admin interface.

Start in-process with ``async with GatewayServer(...) as gw`` (port 0 = ephemeral) or, from
synchronous code and tests, ``with GatewayThread(...) as gw``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from .. import calendars
from ..ib import limits
from ..ib.pacing import PacedRequest, PacingWindow
from .account import AccountBook, SimClock, add_default_options_and_positions
from .market import C, H, L, MarketModel, N, O, T, V, W
from .protocol import (
    MIN_CLIENT_VERSION,
    SERVER_VERSION,
    ProtocolError,
    encode,
    read_frame,
    read_handshake,
)
from .universe import Instrument, build_universe

log = logging.getLogger(__name__)

#: Time zone of the simulated TWS login; end times without a zone are read in it.
LOGIN_TZ = "US/Eastern"

WHAT_TO_SHOW = frozenset({
    "TRADES", "MIDPOINT", "BID", "ASK", "BID_ASK", "ADJUSTED_LAST",
    "HISTORICAL_VOLATILITY", "OPTION_IMPLIED_VOLATILITY",
})


@dataclass(frozen=True)
class LatencyModel:
    """How long answers take. ``realistic`` approximates IB's historical data farm:

    - every historical answer waits ``base_s`` plus ``per_bar_s`` per bar returned;
    - bars of 1 min and larger pass a soft throttle: at most ``concurrent_large``
      requests are served at once, the rest queue (IB's "soft" pacing);
    - contract details and head timestamps wait ``lookup_s``.
    """

    base_s: float = 0.0
    per_bar_s: float = 0.0
    lookup_s: float = 0.0
    concurrent_large: int = 0  # 0 = no throttle

    @classmethod
    def named(cls, name: str) -> LatencyModel:
        if name == "none":
            return cls()
        if name == "realistic":
            return cls(base_s=0.25, per_bar_s=0.0001, lookup_s=0.05, concurrent_large=4)
        raise ValueError(f"unknown latency model {name!r}; allowed: realistic, none")


@dataclass
class Faults:
    """Pending fault injections; each counter is consumed by the next requests."""

    pacing: int = 0
    stall: int = 0
    error_322: int = 0

    def take(self, name: str) -> bool:
        n = getattr(self, name)
        if n > 0:
            setattr(self, name, n - 1)
            return True
        return False


class AuditLog:
    """One JSON line per request and per answer, for tests and benchmarks."""

    def __init__(self, path: Path | None):
        self.path = path
        self._fh = open(path, "a", buffering=1, encoding="utf-8") if path else None  # noqa: SIM115
        self.recent: deque[dict[str, Any]] = deque(maxlen=2000)

    def write(self, **event: Any) -> None:
        event = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                 "mono": round(time.monotonic(), 6), **event}
        self.recent.append(event)
        if self._fh is not None:
            self._fh.write(json.dumps(event, default=str) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class RequestError(Exception):
    """An IB error answer to one request."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


def parse_contract(f: list[str]) -> dict[str, str]:
    keys = ("conId", "symbol", "secType", "lastTradeDateOrContractMonth", "strike", "right",
            "multiplier", "exchange", "primaryExchange", "currency", "localSymbol",
            "tradingClass")
    return dict(zip(keys, f, strict=False))


def describe(c: dict[str, str]) -> str:
    parts = [c.get("symbol") or c.get("localSymbol") or f"conId {c.get('conId')}",
             c.get("secType", ""), c.get("exchange", ""), c.get("currency", ""),
             c.get("lastTradeDateOrContractMonth", "")]
    return " ".join(p for p in parts if p)


_END_FORMS = (
    re.compile(r"^(\d{8})-(\d{2}):(\d{2}):(\d{2})$"),  # UTC
    re.compile(r"^(\d{8}) {1,2}(\d{2}):(\d{2}):(\d{2})(?: (\S+))?$"),
)


def parse_end_datetime(text: str, now: datetime) -> datetime:
    """An endDateTime in any form IB accepts; empty means now."""
    text = text.strip()
    if not text:
        return now
    m = _END_FORMS[0].match(text)
    if m:
        day, hh, mm, ss = m.groups()
        return datetime.strptime(day + hh + mm + ss, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    m = _END_FORMS[1].match(text)
    if m:
        day, hh, mm, ss, zone = m.groups()
        try:
            tz = ZoneInfo(zone or LOGIN_TZ) if zone not in ("GMT", "UTC") else UTC
        except (ZoneInfoNotFoundError, ValueError):
            raise RequestError(limits.ERR_VALIDATION,
                               f"Error validating request.-'bW' : cause - Invalid time zone "
                               f"{zone!r} in end date/time {text!r}") from None
        return datetime.strptime(day + hh + mm + ss, "%Y%m%d%H%M%S").replace(tzinfo=tz)
    if re.fullmatch(r"\d{8}", text):
        d = datetime.strptime(text, "%Y%m%d").replace(tzinfo=ZoneInfo(LOGIN_TZ))
        return d + timedelta(days=1)
    raise RequestError(limits.ERR_VALIDATION,
                       f"Error validating request.-'bW' : cause - Invalid end date/time "
                       f"{text!r}: use 'YYYYMMDD HH:MM:SS [zone]', 'YYYYMMDD-HH:MM:SS' or ''")


def _num(x: float) -> str:
    """Prices as IB prints them: no float noise."""
    return format(round(float(x), 8), ".10g")


class ClientSession:
    """One connected API client."""

    def __init__(self, gateway: GatewayServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.gw = gateway
        self.reader = reader
        self.writer = writer
        self.client_id: int | None = None
        self.peer = writer.get_extra_info("peername")
        self.tasks: dict[tuple[str, int], asyncio.Task] = {}
        self.market_data_type = 1
        self.closed = False

    # -- output -----------------------------------------------------------------------
    def send(self, *fields: object) -> None:
        if self.closed or self.writer.is_closing():
            return
        self.writer.write(encode(fields))

    def error(self, req_id: int, code: int, message: str) -> None:
        self.send(4, 2, req_id, code, message, "")
        if req_id >= 0:
            self.gw.audit.write(client_id=self.client_id, req_id=req_id, message="error",
                                outcome=f"error {code}", code=code, text=message)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for task in list(self.tasks.values()):
                task.cancel()
            with contextlib.suppress(Exception):
                self.writer.close()

    # -- main loop ---------------------------------------------------------------------
    async def run(self) -> None:
        try:
            lo, hi, _opts = await asyncio.wait_for(read_handshake(self.reader), 30)
            if hi < MIN_CLIENT_VERSION or lo > SERVER_VERSION:
                log.warning("client %s offers versions %d..%d; need %d..%d",
                            self.peer, lo, hi, MIN_CLIENT_VERSION, SERVER_VERSION)
                return
            version = min(hi, SERVER_VERSION)
            now = self.gw.clock.now()
            self.send(version, now.strftime("%Y%m%d %H:%M:%S UTC"))
            while True:
                fields = await read_frame(self.reader)
                if not fields:
                    continue
                self.dispatch(fields)
                await self.writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except ProtocolError as exc:
            log.warning("closing client %s (id %s): %s", self.peer, self.client_id, exc)
        finally:
            self.gw.unregister(self)
            self.close()

    def dispatch(self, f: list[str]) -> None:
        try:
            msg_id = int(f[0])
        except ValueError:
            log.warning("client %s sent a message with a non-numeric id %r; ignored",
                        self.client_id, f[0][:40])
            return
        if self.client_id is None and msg_id != 71:
            log.warning("client %s sent message %d before startApi; ignored", self.peer, msg_id)
            return
        handler = self.HANDLERS.get(msg_id)
        if handler is None:
            log.info("client %s: unsupported message %d ignored", self.client_id, msg_id)
            return
        try:
            handler(self, f)
        except (IndexError, ValueError) as exc:
            log.warning("client %s sent a malformed message %d (%s); ignored",
                        self.client_id, msg_id, exc)

    def spawn(self, kind: str, req_id: int, coro) -> None:
        old = self.tasks.pop((kind, req_id), None)
        if old is not None:
            old.cancel()
        task = asyncio.get_running_loop().create_task(self._guard(kind, req_id, coro))
        self.tasks[(kind, req_id)] = task

    async def _guard(self, kind: str, req_id: int, coro) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            pass
        except RequestError as exc:
            self.error(req_id, exc.code, exc.message)
        except Exception:  # a bug in the simulator must not take other clients down
            log.exception("client %s: request %s %d failed", self.client_id, kind, req_id)
            self.error(req_id, limits.ERR_PROCESSING, limits.MSG_PROCESSING)
        finally:
            current = self.tasks.get((kind, req_id))
            if current is asyncio.current_task():
                del self.tasks[(kind, req_id)]

    # -- start -------------------------------------------------------------------------
    def on_start_api(self, f: list[str]) -> None:
        client_id = int(f[2])
        if not self.gw.register(self, client_id):
            self.error(-1, limits.ERR_CLIENT_ID_IN_USE, limits.MSG_CLIENT_ID_IN_USE)
            self.gw.audit.write(client_id=client_id, message="startApi",
                                outcome="error 326")
            self.gw.loop.call_later(0.05, self.close)
            return
        self.client_id = client_id
        self.gw.audit.write(client_id=client_id, message="startApi", outcome="connected")
        self.send(15, 1, self.gw.universe.account)
        self.send(9, 1, 1)
        self.error(-1, 2104, "Market data farm connection is OK:usfarm")
        self.error(-1, 2106, "HMDS data farm connection is OK:ushmds")
        self.error(-1, 2158, "Sec-def data farm connection is OK:secdefil")

    def on_current_time(self, f: list[str]) -> None:
        self.send(49, 1, int(self.gw.clock.now().timestamp()))

    def on_positions(self, f: list[str]) -> None:
        acct = self.gw.universe.account
        for pos in self.gw.universe.positions:
            i = self.gw.universe.instruments[pos.con_id]
            self.send(61, 3, acct, i.con_id, i.symbol, i.sec_type, i.expiry, i.strike, i.right,
                      i.multiplier, i.exchange, i.currency, i.local_symbol, i.trading_class,
                      pos.quantity, pos.avg_cost)
        self.send(62, 1)

    def on_open_orders(self, f: list[str]) -> None:
        self.send(53, 1)

    def on_completed_orders(self, f: list[str]) -> None:
        self.send(102)

    def on_executions(self, f: list[str]) -> None:
        self.send(55, 1, int(f[2]))

    def on_account_updates(self, f: list[str]) -> None:
        subscribe = f[2] in ("1", "True", "true")
        acct = f[3] or self.gw.universe.account
        if not subscribe:
            return
        self.spawn("account", 0, self._account_updates(acct))

    async def _account_updates(self, acct: str) -> None:
        rows = await self.gw.compute(self.gw.book.portfolio)
        total = sum(r.market_value for r in rows)
        unreal = sum(r.unrealized_pnl for r in rows)
        cash = 250_000.0
        for key, value in (("AccountCode", acct), ("Currency", "USD"),
                           ("NetLiquidation", round(cash + total, 2)),
                           ("TotalCashValue", cash), ("UnrealizedPnL", round(unreal, 2)),
                           ("RealizedPnL", 0.0), ("BuyingPower", round(4 * cash, 2))):
            self.send(6, 2, key, value, "USD" if key not in ("AccountCode",) else "", acct)
        for r in rows:
            i = r.inst
            self.send(7, 8, i.con_id, i.symbol, i.sec_type, i.expiry, i.strike, i.right,
                      i.multiplier, i.primary_exchange, i.currency, i.local_symbol,
                      i.trading_class, r.position, round(r.market_price, 6),
                      round(r.market_value, 2), r.avg_cost, round(r.unrealized_pnl, 2), 0.0, acct)
        self.send(8, 1, self.gw.clock.now().astimezone(ZoneInfo(LOGIN_TZ)).strftime("%H:%M"))
        self.send(54, 1, acct)

    def on_account_updates_multi(self, f: list[str]) -> None:
        req_id, acct, model = int(f[2]), f[3] or self.gw.universe.account, f[4]
        self.send(73, 1, req_id, acct, model, "NetLiquidation", "250000", "USD")
        self.send(74, 1, req_id)

    def on_market_data_type(self, f: list[str]) -> None:
        self.market_data_type = int(f[2])

    # -- contracts ---------------------------------------------------------------------
    def resolve(self, contract: dict[str, str], include_expired: bool) -> Instrument:
        found = self.gw.universe.match(contract, include_expired, self.gw.clock.now().date())
        if not found:
            raise RequestError(limits.ERR_NO_SECURITY, limits.MSG_NO_SECURITY)
        if len(found) > 1:
            raise RequestError(limits.ERR_NO_SECURITY,
                               f"{limits.MSG_AMBIGUOUS} ({len(found)} contracts match "
                               f"{describe(contract)})")
        return found[0]

    def on_contract_details(self, f: list[str]) -> None:
        req_id = int(f[2])
        contract = parse_contract(f[3:15])
        include_expired = f[15] == "1" if len(f) > 15 else False
        self.spawn("details", req_id, self._contract_details(req_id, contract, include_expired))

    async def _contract_details(self, req_id: int, contract: dict[str, str],
                                include_expired: bool) -> None:
        self.gw.audit.write(client_id=self.client_id, req_id=req_id,
                            message="reqContractDetails", contract=describe(contract),
                            outcome="request")
        await self.gw.delay(self.gw.latency.lookup_s)
        now = self.gw.clock.now()
        found = self.gw.universe.match(contract, include_expired, now.date())
        if not found:
            raise RequestError(limits.ERR_NO_SECURITY, limits.MSG_NO_SECURITY)
        for i in found:
            profile = i.profile
            trading = calendars.hours_string(profile, now, use_rth=False)
            liquid = calendars.hours_string(profile, now, use_rth=True)
            und_con = 0
            if i.sec_type == "OPT":
                und = self.gw.universe.by_symbol(i.underlying, "STK")
                und_con = und[0].con_id if und else 0
            self.send(
                10, req_id, i.symbol, i.sec_type, i.expiry, i.strike, i.right, i.exchange,
                i.currency, i.local_symbol, i.trading_class, i.trading_class, i.con_id, i.tick,
                i.multiplier, "LMT,MKT,STP", i.valid_exchanges or i.exchange, 1, und_con,
                i.long_name, i.primary_exchange, i.expiry[:6], "", "", "", profile.tz,
                trading, liquid, "", "", 0, "", i.symbol if i.sec_type == "OPT" else "",
                "STK" if i.sec_type == "OPT" else "", "26", i.expiry, "COMMON" if
                i.sec_type == "STK" else "", "1", "1", "1",
            )
        self.send(52, 1, req_id)
        self.gw.audit.write(client_id=self.client_id, req_id=req_id,
                            message="contractDetails", outcome="ok", count=len(found))

    # -- historical data ---------------------------------------------------------------
    def on_historical_data(self, f: list[str]) -> None:
        req_id = int(f[1])
        self.spawn("hist", req_id, self.gw.historical(self, req_id, f))

    def on_cancel_historical(self, f: list[str]) -> None:
        req_id = int(f[2])
        task = self.tasks.pop(("hist", req_id), None)
        self.gw.audit.write(client_id=self.client_id, req_id=req_id,
                            message="cancelHistoricalData",
                            outcome="cancelled" if task else "unknown")
        if task is not None:
            task.cancel()
            self.error(req_id, limits.ERR_HMDS, f"{limits.MSG_QUERY_CANCELLED}: {req_id}")

    def on_head_timestamp(self, f: list[str]) -> None:
        req_id = int(f[1])
        self.spawn("head", req_id, self.gw.head_timestamp(self, req_id, f))

    def on_cancel_head_timestamp(self, f: list[str]) -> None:
        req_id = int(f[1])
        task = self.tasks.pop(("head", req_id), None)
        if task is not None:
            task.cancel()
        self.gw.release_open(self, ("head", req_id))

    # -- market data -------------------------------------------------------------------
    def on_market_data(self, f: list[str]) -> None:
        req_id = int(f[2])
        contract = parse_contract(f[3:15])
        k = 15
        if f[k] == "1":  # delta-neutral contract follows
            k += 3
        snapshot = f[k + 2] == "1" or f[k + 3] == "1"
        self.spawn("mkt", req_id, self._market_data(req_id, contract, snapshot))

    def on_cancel_market_data(self, f: list[str]) -> None:
        task = self.tasks.pop(("mkt", int(f[2])), None)
        if task is not None:
            task.cancel()

    async def _market_data(self, req_id: int, contract: dict[str, str], snapshot: bool) -> None:
        inst = self.resolve(contract, include_expired=False)
        self.gw.audit.write(client_id=self.client_id, req_id=req_id, message="reqMktData",
                            contract=describe(contract), con_id=inst.con_id,
                            outcome="snapshot" if snapshot else "stream")
        self.send(58, 1, req_id, self.market_data_type)
        while True:
            await self._send_ticks(req_id, inst)
            if snapshot:
                self.send(57, 1, req_id)
                return
            await asyncio.sleep(self.gw.tick_interval)

    async def _send_ticks(self, req_id: int, inst: Instrument) -> None:
        book = self.gw.book
        now = self.gw.clock.now()
        delayed = self.market_data_type in (3, 4)
        if inst.sec_type == "OPT":
            g = await self.gw.compute(book.greeks, inst, now)
            price = g.price
        else:
            g = None
            price = await self.gw.compute(book.price, inst, now)
        spread = max(inst.tick, round(price * 0.0005 / inst.tick) * inst.tick)
        bid, ask = round(price - spread / 2, 6), round(price + spread / 2, 6)
        base = 65 if delayed else 0  # delayed bid/ask/last are 66/67/68
        self.send(1, 6, req_id, base + 1 if delayed else 1, _num(bid), 100, 0)
        self.send(1, 6, req_id, base + 2 if delayed else 2, _num(ask), 100, 0)
        self.send(1, 6, req_id, base + 3 if delayed else 4, _num(price), 10, 0)
        if g is not None:
            for tick_type in ((80, 81, 82, 83) if delayed else (10, 11, 12, 13)):
                opt_price = {10: bid, 80: bid, 11: ask, 81: ask}.get(tick_type, g.price)
                self.send(21, req_id, tick_type, 0, g.implied_vol, g.delta, _num(opt_price), 0.0,
                          g.gamma, g.vega, g.theta, _num(g.und_price))

    def on_pnl(self, f: list[str]) -> None:
        req_id = int(f[1])
        self.spawn("pnl", req_id, self._pnl(req_id))

    def on_cancel_pnl(self, f: list[str]) -> None:
        task = self.tasks.pop(("pnl", int(f[1])), None)
        if task is not None:
            task.cancel()

    async def _pnl(self, req_id: int) -> None:
        while True:
            daily, unreal, real = await self.gw.compute(self.gw.book.pnl)
            self.send(94, req_id, round(daily, 2), round(unreal, 2), round(real, 2))
            await asyncio.sleep(self.gw.tick_interval)

    HANDLERS = {
        71: on_start_api, 49: on_current_time, 61: on_positions, 5: on_open_orders,
        99: on_completed_orders, 7: on_executions, 6: on_account_updates,
        76: on_account_updates_multi, 59: on_market_data_type, 9: on_contract_details,
        20: on_historical_data, 25: on_cancel_historical, 87: on_head_timestamp,
        90: on_cancel_head_timestamp, 1: on_market_data, 2: on_cancel_market_data,
        92: on_pnl, 93: on_cancel_pnl,
    }


class GatewayServer:
    """The simulator: socket server, market model, rules and faults."""

    def __init__(self, host: str = "127.0.0.1", port: int = 4002, *, seed: int = 0,
                 latency: str | LatencyModel = "none", universe: Path | None = None,
                 audit_log: Path | None = None, clock: datetime | SimClock | None = None,
                 pacing_time_scale: float = 1.0, portal_port: int | None = None,
                 portal_tls: bool = True, admin_port: int | None = None,
                 tick_interval: float = 1.0):
        if pacing_time_scale <= 0:
            raise ValueError("pacing_time_scale must be > 0")
        self.host, self.port = host, port
        self.clock = clock if isinstance(clock, SimClock) else SimClock(clock)
        self.latency = latency if isinstance(latency, LatencyModel) else LatencyModel.named(latency)
        self.market = MarketModel(seed)
        now = self.clock.now()
        self.universe = build_universe(now.date(), universe)
        add_default_options_and_positions(self.universe, self.market, now)
        self.book = AccountBook(self.universe, self.market, self.clock)
        self.audit = AuditLog(audit_log)
        self.pacing = PacingWindow(limits.PacingLimits(time_scale=pacing_time_scale))
        self.faults = Faults()
        self.tick_interval = tick_interval
        self.portal_port, self.portal_tls = portal_port, portal_tls
        self.admin_port = admin_port
        self.clients: dict[int, ClientSession] = {}
        self.sessions: set[ClientSession] = set()
        self.open_requests: dict[tuple[int, str, int], float] = {}
        self._restored = asyncio.Event()
        self._restored.set()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "gateway-market")
        self._throttle: asyncio.Semaphore | None = None
        self._server: asyncio.base_events.Server | None = None
        self._portal = None
        self._admin: asyncio.base_events.Server | None = None
        self.loop: asyncio.AbstractEventLoop

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> GatewayServer:
        self.loop = asyncio.get_running_loop()
        if self.latency.concurrent_large:
            self._throttle = asyncio.Semaphore(self.latency.concurrent_large)
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.admin_port is not None:
            from .admin import start_admin

            self._admin = await start_admin(self, self.admin_port)
            self.admin_port = self._admin.sockets[0].getsockname()[1]
        if self.portal_port is not None:
            from .portal import start_portal

            self._portal = await start_portal(self.book, "127.0.0.1", self.portal_port,
                                              tls=self.portal_tls)
            self.portal_port = self._portal.port
        log.info("gateway simulator listening on %s:%d", self.host, self.port)
        return self

    async def stop(self) -> None:
        for s in list(self.sessions):
            s.close()
        for srv in (self._server, self._admin):
            if srv is not None:
                srv.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(srv.wait_closed(), 2)
        if self._portal is not None:
            await self._portal.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.audit.close()

    async def __aenter__(self) -> GatewayServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        session = ClientSession(self, reader, writer)
        self.sessions.add(session)
        await session.run()

    def register(self, session: ClientSession, client_id: int) -> bool:
        if client_id in self.clients:
            return False
        self.clients[client_id] = session
        return True

    def unregister(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        if session.client_id is not None and self.clients.get(session.client_id) is session:
            del self.clients[session.client_id]
            self.audit.write(client_id=session.client_id, message="disconnect", outcome="closed")
        for key in [k for k in self.open_requests if k[0] == id(session)]:
            del self.open_requests[key]

    async def compute(self, fn, *args):
        """Run market-model work off the event loop (one worker: the caches are not
        thread-safe), so slow generation never stalls other clients."""
        return await self.loop.run_in_executor(self._executor, fn, *args)

    async def delay(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)

    # -- faults ----------------------------------------------------------------------------
    def disconnect_all(self) -> int:
        """Close every client connection now."""
        sessions = list(self.sessions)
        for s in sessions:
            s.close()
        self.audit.write(message="fault", outcome="disconnect_all", count=len(sessions))
        return len(sessions)

    async def nightly_reset(self, pause: float = 2.0, restore: str = "1102") -> None:
        """IB's nightly reset: 1100, requests held for ``pause`` seconds, then 1102
        (``restore='1102'``) or every socket closed (``restore='close'``)."""
        if restore not in ("1102", "close"):
            raise ValueError("restore must be '1102' or 'close'")
        self.audit.write(message="fault", outcome=f"reset {restore}", pause=pause)
        self._restored.clear()
        for s in list(self.sessions):
            s.error(-1, limits.ERR_CONNECTIVITY_LOST, limits.MSG_CONNECTIVITY_LOST)
        try:
            await asyncio.sleep(pause)
        finally:
            if restore == "close":
                self.disconnect_all()
            else:
                for s in list(self.sessions):
                    s.error(-1, limits.ERR_RESTORED_DATA_MAINTAINED,
                            limits.MSG_RESTORED_DATA_MAINTAINED)
            self._restored.set()

    # -- open requests and pacing ----------------------------------------------------------
    def claim_open(self, session: ClientSession, key: tuple[str, int]) -> None:
        if len(self.open_requests) >= limits.MAX_OPEN_HISTORICAL_REQUESTS:
            raise RequestError(limits.ERR_PROCESSING, limits.MSG_TOO_MANY_OPEN)
        self.open_requests[(id(session), *key)] = time.monotonic()

    def release_open(self, session: ClientSession, key: tuple[str, int]) -> None:
        self.open_requests.pop((id(session), *key), None)

    def check_pacing(self, request: PacedRequest) -> None:
        now = time.monotonic()
        self.pacing.prune(now)
        rule = self.pacing.violation(request, now)
        if rule is not None:
            self.audit.write(message="pacing", outcome="violation", rule=rule)
            raise RequestError(limits.ERR_HMDS, limits.MSG_PACING_VIOLATION)
        self.pacing.record(request, now)

    # -- historical requests ---------------------------------------------------------------
    async def historical(self, session: ClientSession, req_id: int, f: list[str]) -> None:
        contract = parse_contract(f[2:14])
        include_expired = f[14] == "1"
        end_text, bar_size, duration_text = f[15], f[16], f[17]
        rth_text, what, fmt_text = f[18], f[19], f[20]
        self.audit.write(client_id=session.client_id, req_id=req_id,
                         message="reqHistoricalData", contract=describe(contract),
                         bar_size=bar_size, duration=duration_text, end=end_text,
                         what_to_show=what, use_rth=rth_text, outcome="request")
        key = ("hist", req_id)
        self.claim_open(session, key)
        try:
            await self._historical(session, req_id, contract, include_expired, end_text,
                                   bar_size, duration_text, rth_text, what, fmt_text)
        finally:
            self.release_open(session, key)

    async def _historical(self, session: ClientSession, req_id: int, contract: dict[str, str],
                          include_expired: bool, end_text: str, bar_size: str,
                          duration_text: str, rth_text: str, what: str, fmt_text: str) -> None:
        await self._restored.wait()
        if self.faults.take("stall"):
            self.audit.write(client_id=session.client_id, req_id=req_id, message="fault",
                             outcome="stalled")
            await asyncio.Event().wait()  # never answered; ends on cancel or disconnect
        if self.faults.take("pacing"):
            raise RequestError(limits.ERR_HMDS, limits.MSG_PACING_VIOLATION)
        if self.faults.take("error_322"):
            raise RequestError(limits.ERR_PROCESSING, limits.MSG_PROCESSING)
        if bar_size not in limits.BAR_SIZE_SECONDS:
            raise RequestError(limits.ERR_VALIDATION,
                               f"Error validating request.-'bP' : cause - Historical data bar "
                               f"size setting is invalid: {bar_size!r}. Legal ones are: "
                               f"{', '.join(limits.BAR_SIZE_SECONDS)}")
        try:
            duration = limits.parse_duration(duration_text)
        except limits.DurationError as exc:
            raise RequestError(limits.ERR_VALIDATION,
                               f"Error validating request.-'bQ' : cause - {exc}") from None
        if what not in WHAT_TO_SHOW:
            raise RequestError(limits.ERR_VALIDATION,
                               f"Error validating request.-'bS' : cause - Invalid whatToShow "
                               f"{what!r}")
        if rth_text not in ("0", "1") or fmt_text not in ("1", "2"):
            raise RequestError(limits.ERR_VALIDATION,
                               "Error validating request.-'bR' : cause - useRTH must be 0 or 1 "
                               "and formatDate 1 or 2")
        now = self.clock.now()
        end = parse_end_datetime(end_text, now)
        inst = session.resolve(contract, include_expired)
        if limits.is_small_bar(bar_size):
            self.check_pacing(self.paced(inst, contract, what, end_text, duration_text,
                                         bar_size, rth_text))
        if duration.span > limits.MAX_DURATION[bar_size]:
            raise RequestError(limits.ERR_VALIDATION,
                               f"Error validating request.-'bX' : cause - Time length exceed "
                               f"max: {duration} for bar size {bar_size} (max "
                               f"{limits.MAX_DURATION[bar_size]})")
        use_rth = rth_text == "1"
        no_data = RequestError(limits.ERR_HMDS, f"{limits.MSG_NO_DATA}: {inst.local_symbol}@"
                               f"{inst.exchange} {what.title()}")
        if (what == "TRADES" and inst.sec_type == "CASH") or (
                what == "ADJUSTED_LAST" and inst.sec_type != "STK") or (
                what.endswith("VOLATILITY") and inst.sec_type not in ("STK", "IND")) or (
                inst.sec_type == "OPT"):
            raise no_data
        end = min(end, now)
        start = end - duration.span
        if limits.is_small_bar(bar_size):
            start = max(start, now - limits.SMALL_BAR_HISTORY)
        if start >= end:
            raise no_data
        block = await self.compute(self.market.bars, inst, bar_size, start, end, use_rth, now)
        if len(block) == 0:
            raise no_data
        block = self.transform(block, what, inst)
        if self._throttle is not None and not limits.is_small_bar(bar_size):
            async with self._throttle:
                await self.delay(self.latency.base_s + self.latency.per_bar_s * len(block))
        else:
            await self.delay(self.latency.base_s + self.latency.per_bar_s * len(block))
        daily = limits.is_daily_or_larger(bar_size)
        tz = ZoneInfo(inst.profile.tz)
        fields: list[object] = [17, req_id, self._fmt_time(start, "1", tz, False),
                                self._fmt_time(end, "1", tz, False), len(block)]
        for r in block:
            t = datetime.fromtimestamp(float(r[T]), UTC)
            fields += [self._fmt_time(t, fmt_text, tz, daily), _num(r[O]), _num(r[H]),
                       _num(r[L]), _num(r[C]), _num(r[V]), _num(r[W]), int(r[N])]
        session.send(*fields)
        self.audit.write(client_id=session.client_id, req_id=req_id, message="historicalData",
                         con_id=inst.con_id, bar_size=bar_size, outcome="bars", bars=len(block))

    @staticmethod
    def paced(inst: Instrument, contract: dict[str, str], what: str, end_text: str,
              duration: str, bar_size: str, rth: str) -> PacedRequest:
        exchange = contract.get("exchange") or inst.exchange
        return PacedRequest(
            identity=f"{inst.con_id}|{exchange}|{end_text}|{duration}|{bar_size}|{what}|{rth}",
            tick_key=f"{inst.con_id}|{exchange}|{what}",
            weight=2 if what == "BID_ASK" else 1,
        )

    @staticmethod
    def _fmt_time(t: datetime, fmt: str, tz: ZoneInfo, daily: bool) -> str:
        if daily:
            return t.strftime("%Y%m%d")
        if fmt == "2":
            return str(int(t.timestamp()))
        return t.astimezone(tz).strftime("%Y%m%d %H:%M:%S ") + str(tz.key)

    @staticmethod
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

    async def head_timestamp(self, session: ClientSession, req_id: int, f: list[str]) -> None:
        contract = parse_contract(f[2:14])
        include_expired = f[14] == "1"
        rth_text, what, fmt_text = f[15], f[16], f[17]
        self.audit.write(client_id=session.client_id, req_id=req_id, message="reqHeadTimeStamp",
                         contract=describe(contract), what_to_show=what, use_rth=rth_text,
                         outcome="request")
        key = ("head", req_id)
        self.claim_open(session, key)  # open until the client cancels it, as at IB
        try:
            await self._head_timestamp(session, req_id, contract, include_expired, rth_text,
                                       what, fmt_text)
        except BaseException:
            self.release_open(session, key)
            raise

    async def _head_timestamp(self, session: ClientSession, req_id: int,
                              contract: dict[str, str], include_expired: bool, rth_text: str,
                              what: str, fmt_text: str) -> None:
        await self._restored.wait()
        inst = session.resolve(contract, include_expired)
        self.check_pacing(PacedRequest(
            identity=f"head|{inst.con_id}|{what}|{rth_text}",
            tick_key=f"{inst.con_id}|{contract.get('exchange') or inst.exchange}|{what}"))
        if what not in WHAT_TO_SHOW:
            raise RequestError(limits.ERR_VALIDATION,
                               f"Error validating request.-'bS' : cause - Invalid whatToShow "
                               f"{what!r}")
        if (what == "TRADES" and inst.sec_type == "CASH") or inst.sec_type == "OPT":
            raise RequestError(limits.ERR_HMDS, f"{limits.MSG_NO_DATA}: {inst.local_symbol}@"
                               f"{inst.exchange} {what.title()}")
        await self.delay(self.latency.lookup_s)
        use_rth = rth_text == "1"
        sessions = calendars.sessions_between(inst.profile, inst.head,
                                              inst.head + timedelta(days=10), use_rth)
        first = max(sessions[0].open, inst.head) if sessions else inst.head
        value = str(int(first.timestamp())) if fmt_text == "2" else first.strftime(
            "%Y%m%d-%H:%M:%S")
        session.send(88, req_id, value)
        self.audit.write(client_id=session.client_id, req_id=req_id, message="headTimestamp",
                         con_id=inst.con_id, outcome="ok", value=value)


class GatewayThread:
    """Run a :class:`GatewayServer` on its own event loop in a background thread.

    For synchronous code and tests whose own loop runs the IB client::

        with GatewayThread(port=0, clock=datetime(2025, 3, 3, 15, tzinfo=UTC)) as gw:
            ib.connect("127.0.0.1", gw.port, clientId=1)
    """

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("port", 0)
        self.server = GatewayServer(**kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gateway",
                                        daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def __enter__(self) -> GatewayThread:
        self._thread.start()
        self.call(self.server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            with contextlib.suppress(Exception):
                self.call(self.server.stop(), timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def call(self, coro_or_fn, *args: Any, timeout: float = 30) -> Any:
        """Run a coroutine, or call a function, on the gateway's loop and return its result."""
        if asyncio.iscoroutine(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn, self._loop).result(timeout)

        async def _call():
            return coro_or_fn(*args)

        return asyncio.run_coroutine_threadsafe(_call(), self._loop).result(timeout)

    def inject(self, fault: str, count: int = 1) -> None:
        """Queue ``count`` faults of one kind: 'pacing', 'stall' or 'error_322'."""
        if fault not in ("pacing", "stall", "error_322"):
            raise ValueError(f"unknown fault {fault!r}; allowed: pacing, stall, error_322")

        def _inject():
            setattr(self.server.faults, fault, getattr(self.server.faults, fault) + count)

        self.call(_inject)

    def reset(self, pause: float = 1.0, restore: str = "1102") -> concurrent.futures.Future:
        """Start a nightly reset; returns a future that completes when it is over."""
        return asyncio.run_coroutine_threadsafe(self.server.nightly_reset(pause, restore),
                                                self._loop)

    def disconnect_all(self) -> int:
        return self.call(self.server.disconnect_all)
