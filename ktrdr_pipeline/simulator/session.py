"""Client sessions: one per TWS API connection, and the registry of connected clients.

A session reads framed messages, dispatches them by message id and answers; requests that
take time run as tasks, so a slow historical request never holds up the connection.
Sessions reach the rest of the simulator through a small :class:`SessionHost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from ..domain import calendars, ib_rules
from . import reference_data, refusals, rules
from .account import AccountBook, price_text
from .audit import AuditLog
from .clock import SimClock
from .historical import BarsRequest, HeadTimestampRequest, HistoricalService
from .latency import LatencyModel, delay
from .options import option_computation
from .protocol import (
    SERVER_VERSION,
    ProtocolError,
    describe,
    encode,
    parse_contract,
    read_frame,
    read_handshake,
)
from .rules import LOGIN_TZ, OpenRequests, RequestError, resolve_contract
from .universe import Instrument, Universe

log = logging.getLogger(__name__)

#: IB's error for incompatible API versions ("The TWS is out of date and must be upgraded").
UPDATE_TWS = 503
#: The server version from which the error message carries advancedOrderRejectJson
#: (ibapi's MIN_SERVER_VER_ADVANCED_ORDER_REJECT).
MIN_VERSION_ADVANCED_REJECT = 166


class SessionRegistry:
    """Every open connection, and the clients among them that started the API (by id).

    A connection that goes away leaves the registry and releases its open historical
    requests (``open_requests``).
    """

    def __init__(self, audit: AuditLog, open_requests: OpenRequests):
        self.audit = audit
        self.open_requests = open_requests
        self.clients: dict[int, ClientSession] = {}
        self.sessions: set[ClientSession] = set()

    def add(self, session: ClientSession) -> None:
        self.sessions.add(session)

    def register(self, session: ClientSession, client_id: int) -> bool:
        """Give ``session`` its client id; False if another client holds it (326)."""
        if client_id in self.clients:
            return False
        self.clients[client_id] = session
        return True

    def remove(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        if session.client_id is not None and self.clients.get(session.client_id) is session:
            del self.clients[session.client_id]
            self.audit.write(client_id=session.client_id, message="disconnect", outcome="closed")
        self.open_requests.release_all(id(session))


class SessionHost(Protocol):
    """What a session needs of the gateway."""

    audit: AuditLog
    clock: SimClock
    universe: Universe
    book: AccountBook
    latency: LatencyModel
    tick_interval: float
    historical: HistoricalService
    registry: SessionRegistry

    def compute(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]: ...


class ClientSession:
    """One connected API client: the handshake, then one handler per message id."""

    def __init__(self, host: SessionHost, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.gw = host
        self.reader = reader
        self.writer = writer
        self.client_id: int | None = None
        self.peer = writer.get_extra_info("peername")
        self.tasks: dict[tuple[str, int], asyncio.Task] = {}
        self.market_data_type = 1
        self.next_order_id = 1
        self.closed = False

    # -- output -----------------------------------------------------------------------
    def send(self, *fields: object) -> None:
        if self.closed or self.writer.is_closing():
            return
        self.writer.write(encode(fields))

    def error(self, req_id: int, code: int, message: str) -> None:
        if req_id >= 0:  # audit first, so a client that saw the answer finds it logged
            self.gw.audit.write(client_id=self.client_id, req_id=req_id, message="error",
                                outcome=f"error {code}", code=code, text=message)
        self.send(4, 2, req_id, code, message, "")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for task in list(self.tasks.values()):
                task.cancel()
            with contextlib.suppress(Exception):
                self.writer.close()

    # -- main loop ---------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until the client leaves or the gateway closes it."""
        self.gw.registry.add(self)
        try:
            lo, hi, _opts = await asyncio.wait_for(read_handshake(self.reader), 30)
            if lo > SERVER_VERSION:
                log.warning("client %s requires versions %d..%d; this gateway speaks %d",
                            self.peer, lo, hi, SERVER_VERSION)
                return
            version = min(hi, SERVER_VERSION)
            now = self.gw.clock.now()
            self.send(version, now.strftime("%Y%m%d %H:%M:%S UTC"))
            if version < SERVER_VERSION:
                await self._refuse_version(hi)
                return
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
            self.gw.registry.remove(self)
            self.close()

    async def _refuse_version(self, offered: int) -> None:
        """Refuse a client whose highest version is below the only one this simulator
        speaks (178, ``docs/ib-facts.md`` §7), clearly instead of with layouts it cannot
        read: the handshake answered with the negotiated version (so the client decodes
        what follows, as a real gateway answers with the version both speak), then, once
        the client has started the API, error 503 (IB's code for incompatible versions)
        with reqId -1 in that version's error layout, and the socket closed."""
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, ProtocolError):
            await asyncio.wait_for(read_frame(self.reader), 5)  # startApi
        text = (f"The TWS is out of date and must be upgraded: this IB Gateway simulator speaks "
                f"API server version {SERVER_VERSION} only and the client offers at most "
                f"version {offered}; use a client that offers {SERVER_VERSION} (ib_async 2.1 "
                f"offers 157..178)")
        log.warning("client %s offers at most version %d; refused (503)", self.peer, offered)
        # the error message has carried advancedOrderRejectJson since server version 166
        fields: list[object] = [4, 2, -1, UPDATE_TWS, text]
        if offered >= MIN_VERSION_ADVANCED_REJECT:
            fields.append("")
        self.send(*fields)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

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
        if handler is None and msg_id in refusals.REFUSALS:
            handler = ClientSession.refuse_by_id
        if handler is None:
            if msg_id not in refusals.UNANSWERED:
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
            self.error(req_id, ib_rules.ERR_PROCESSING, ib_rules.MSG_PROCESSING)
        finally:
            current = self.tasks.get((kind, req_id))
            if current is asyncio.current_task():
                del self.tasks[(kind, req_id)]

    # -- start -------------------------------------------------------------------------
    def on_start_api(self, f: list[str]) -> None:
        client_id = int(f[2])
        if not self.gw.registry.register(self, client_id):
            self.error(-1, ib_rules.ERR_CLIENT_ID_IN_USE, ib_rules.MSG_CLIENT_ID_IN_USE)
            self.gw.audit.write(client_id=client_id, message="startApi",
                                outcome="error 326")
            asyncio.get_running_loop().call_later(0.05, self.close)
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
        for key, value, currency in await self.gw.compute(self.gw.book.values):
            self.send(6, 2, key, value, currency, acct)
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
        self.spawn("acctmulti", req_id, self._account_updates_multi(req_id, acct, model))

    async def _account_updates_multi(self, req_id: int, acct: str, model: str) -> None:
        for key, value, currency in await self.gw.compute(self.gw.book.values):
            self.send(73, 1, req_id, acct, model, key, value, currency)
        self.send(74, 1, req_id)

    def on_account_summary(self, f: list[str]) -> None:
        req_id, tags = int(f[2]), f[4]
        self.spawn("summary", req_id, self._account_summary(req_id, tags))

    async def _account_summary(self, req_id: int, tags: str) -> None:
        for message in await self.gw.compute(reference_data.account_summary, self.gw.book,
                                              req_id, tags):
            self.send(*message)

    def on_positions_multi(self, f: list[str]) -> None:
        req_id, model = int(f[2]), f[4]
        acct = self.gw.universe.account
        for pos in self.gw.universe.positions:
            i = self.gw.universe.instruments[pos.con_id]
            self.send(71, 1, req_id, acct, i.con_id, i.symbol, i.sec_type, i.expiry, i.strike,
                      i.right, i.multiplier, i.exchange, i.currency, i.local_symbol,
                      i.trading_class, pos.quantity, pos.avg_cost, model)
        self.send(72, 1, req_id)

    def on_pnl_single(self, f: list[str]) -> None:
        req_id, con_id = int(f[1]), int(f[4] or 0)
        self.spawn("pnl", req_id, self._pnl_single(req_id, con_id))

    async def _pnl_single(self, req_id: int, con_id: int) -> None:
        while True:
            rows = await self.gw.compute(self.gw.book.portfolio)
            row = next((r for r in rows if r.inst.con_id == con_id), None)
            if row is None:  # no position: IB reports zeros
                self.send(95, req_id, 0, 0.0, 0.0, 0.0, 0.0)
            else:
                self.send(95, req_id, row.position, 0.0, round(row.unrealized_pnl, 2), 0.0,
                          round(row.market_value, 2))
            await asyncio.sleep(self.gw.tick_interval)

    # -- orders: the simulator never trades (refusals.py) ----------------------------------
    def on_place_order(self, f: list[str]) -> None:
        """An order (or what-if order) is rejected: 200 when its contract is unknown, as IB
        answers, else 201 "Order rejected - reason:…"."""
        order_id = int(f[1])
        try:
            resolve_contract(self.gw.universe, parse_contract(f[2:14]), False,
                             self.gw.clock.now())
        except RequestError as exc:
            self.error(order_id, exc.code, exc.message)
            return
        self.refuse(3, f)

    def on_cancel_order(self, f: list[str]) -> None:
        order_id = int(f[2])
        self.error(order_id, refusals.CANCEL_NOT_FOUND, refusals.cancel_not_found(order_id))

    def on_req_ids(self, f: list[str]) -> None:
        self.next_order_id += 1
        self.send(9, 1, self.next_order_id)

    def on_all_open_orders(self, f: list[str]) -> None:
        self.send(53, 1)

    def on_managed_accounts(self, f: list[str]) -> None:
        self.send(15, 1, self.gw.universe.account)

    # -- what TWS itself answers: display groups, API verification, user info -------------
    def on_query_display_groups(self, f: list[str]) -> None:
        self.send(67, 1, int(f[2]), "1|2|3|4|5|6|7")  # TWS has seven colour groups

    def on_subscribe_group_events(self, f: list[str]) -> None:
        self.send(68, 1, int(f[2]), "")

    def on_update_display_group(self, f: list[str]) -> None:
        self.send(68, 1, int(f[2]), f[3])

    def on_verify(self, f: list[str]) -> None:
        text = "API verification is not needed: this gateway accepts every client"
        if f[0] in ("72", "73"):
            self.send(70, 1, 0, text)
        else:
            self.send(66, 1, 0, text)

    def on_user_info(self, f: list[str]) -> None:
        self.send(107, int(f[1]), "")

    def on_soft_dollar_tiers(self, f: list[str]) -> None:
        self.send(77, int(f[1]), 0)

    def on_family_codes(self, f: list[str]) -> None:
        self.send(78, 0)

    def on_depth_exchanges(self, f: list[str]) -> None:
        self.send(80, 0)  # no market depth anywhere (see refusals.py)

    def on_smart_components(self, f: list[str]) -> None:
        self.send(82, int(f[1]), 0)

    def on_news_providers(self, f: list[str]) -> None:
        self.send(85, 0)  # no news providers (news requests get 10276)

    def on_scanner_parameters(self, f: list[str]) -> None:
        self.send(19, 1, '<?xml version="1.0" encoding="UTF-8"?><ScanParameterResponse>'
                         '<InstrumentList/><LocationTree/><ScanTypeList/>'
                         '</ScanParameterResponse>')

    # -- reference data ------------------------------------------------------------------
    def on_matching_symbols(self, f: list[str]) -> None:
        self.send(*reference_data.matching_symbols(self.gw.universe, int(f[1]), f[2]))

    def on_sec_def_opt_params(self, f: list[str]) -> None:
        req_id = int(f[1])
        for message in reference_data.option_chain_params(
                self.gw.universe, req_id, f[2], f[3], f[4], int(f[5] or 0)):
            self.send(*message)

    def on_market_rule(self, f: list[str]) -> None:
        self.send(*reference_data.market_rule(int(f[1])))

    # -- option calculations (the simulator's option model) ------------------------------
    def on_calculate_implied_vol(self, f: list[str]) -> None:
        req_id = int(f[2])
        self.spawn("calc", req_id, self._option_calc(req_id, parse_contract(f[3:15]),
                                                     price=float(f[15]), und=float(f[16])))

    def on_calculate_option_price(self, f: list[str]) -> None:
        req_id = int(f[2])
        self.spawn("calc", req_id, self._option_calc(req_id, parse_contract(f[3:15]),
                                                     vol=float(f[15]), und=float(f[16])))

    async def _option_calc(self, req_id: int, contract: dict[str, str], *, und: float,
                           price: float | None = None, vol: float | None = None) -> None:
        inst = resolve_contract(self.gw.universe, contract, False, self.gw.clock.now())
        if inst.sec_type != "OPT":
            raise RequestError(ib_rules.ERR_VALIDATION,
                               "Error validating request.-'bL' : cause - option calculations "
                               "need an option contract")
        try:
            g = option_computation(inst, self.gw.clock.now(), und, price=price, vol=vol)
        except ValueError as exc:
            raise RequestError(ib_rules.ERR_VALIDATION,
                               f"Error validating request.-'bL' : cause - {exc}") from None
        # tick type 53: a custom option computation (ib_async maps it, docs/ib-facts.md §7)
        self.send(21, req_id, 53, 0, g.implied_vol, g.delta, price_text(g.price), 0.0,
                  g.gamma, g.vega, g.theta, price_text(und))

    def refuse(self, msg_id: int, f: list[str]) -> None:
        """Answer a request the simulator does not serve with IB's error (refusals.py)."""
        refusal = refusals.REFUSALS[msg_id]
        req_id = int(f[refusal.req_id_field]) if refusal.req_id_field is not None else -1
        self.error(req_id, refusal.code, refusal.message())

    def on_market_data_type(self, f: list[str]) -> None:
        self.market_data_type = int(f[2])

    # -- contracts ---------------------------------------------------------------------
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
        await delay(self.gw.latency.lookup_s)
        now = self.gw.clock.now()
        found = self.gw.universe.match(contract, include_expired, now.date())
        if not found:
            raise RequestError(ib_rules.ERR_NO_SECURITY, ib_rules.MSG_NO_SECURITY)
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
    def refuse_by_id(self, f: list[str]) -> None:
        self.refuse(int(f[0]), f)

    def on_historical_data(self, f: list[str]) -> None:
        req_id = int(f[1])
        if f[19] == "SCHEDULE":
            self.spawn("hist", req_id, self._schedule(req_id, parse_contract(f[2:14]),
                                                      f[14] == "1", f[15], f[17], f[18]))
            return
        req = BarsRequest(contract=parse_contract(f[2:14]), include_expired=f[14] == "1",
                          end=f[15], bar_size=f[16], duration=f[17], use_rth=f[18],
                          what_to_show=f[19], format_date=f[20])
        self.spawn("hist", req_id, self._historical_data(req_id, req))

    async def _historical_data(self, req_id: int, req: BarsRequest) -> None:
        def warn(code: int, text: str) -> None:
            self.error(req_id, code, text)

        self.send(*await self.gw.historical.bars(id(self), self.client_id, req_id, req,
                                                 warn))

    async def _schedule(self, req_id: int, contract: dict[str, str], include_expired: bool,
                        end_text: str, duration: str, rth_text: str) -> None:
        """whatToShow=SCHEDULE: the trading sessions of ``N D`` ending at the end time, from
        the session calendar (ib_async's reqHistoricalSchedule asks for ``N D`` of daily
        bars)."""
        now = self.gw.clock.now()
        rules.check_end_allowed(contract, end_text)
        end = min(rules.parse_end_datetime(end_text, now), now)
        try:
            count = ib_rules.parse_duration(duration)
        except ib_rules.DurationError as exc:
            raise RequestError(ib_rules.ERR_HMDS, f"{ib_rules.HMDS_PREFIX}{exc}") from None
        inst = resolve_contract(self.gw.universe, contract, include_expired, now)
        sessions = count.count if count.unit == "D" else max(1, count.span.days * 5 // 7)
        self.send(*await self.gw.compute(reference_data.historical_schedule, inst, req_id,
                                         end, sessions, rth_text == "1"))

    def on_cancel_historical(self, f: list[str]) -> None:
        req_id = int(f[2])
        task = self.tasks.pop(("hist", req_id), None)
        self.gw.audit.write(client_id=self.client_id, req_id=req_id,
                            message="cancelHistoricalData",
                            outcome="cancelled" if task else "unknown")
        if task is not None:
            task.cancel()
            self.error(req_id, ib_rules.ERR_HMDS, f"{ib_rules.MSG_QUERY_CANCELLED}: {req_id}")

    def on_head_timestamp(self, f: list[str]) -> None:
        req_id = int(f[1])
        req = HeadTimestampRequest(contract=parse_contract(f[2:14]),
                                   include_expired=f[14] == "1", use_rth=f[15],
                                   what_to_show=f[16], format_date=f[17])
        self.spawn("head", req_id, self._head_timestamp(req_id, req))

    async def _head_timestamp(self, req_id: int, req: HeadTimestampRequest) -> None:
        self.send(*await self.gw.historical.head_timestamp(id(self), self.client_id, req_id,
                                                           req))

    def on_cancel_head_timestamp(self, f: list[str]) -> None:
        req_id = int(f[1])
        task = self.tasks.pop(("head", req_id), None)
        if task is not None:
            task.cancel()
        self.gw.historical.cancel_head_timestamp(id(self), req_id)

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
        inst = resolve_contract(self.gw.universe, contract, False, self.gw.clock.now())
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
        q = await self.gw.compute(self.gw.book.quote, inst, self.gw.clock.now())
        delayed = self.market_data_type in (3, 4)
        base = 65 if delayed else 0  # delayed bid/ask/last are 66/67/68
        self.send(1, 6, req_id, base + 1 if delayed else 1, price_text(q.bid), 100, 0)
        self.send(1, 6, req_id, base + 2 if delayed else 2, price_text(q.ask), 100, 0)
        self.send(1, 6, req_id, base + 3 if delayed else 4, price_text(q.price), 10, 0)
        g = q.greeks
        if g is not None:
            for tick_type in ((80, 81, 82, 83) if delayed else (10, 11, 12, 13)):
                opt_price = {10: q.bid, 80: q.bid, 11: q.ask, 81: q.ask}.get(tick_type, g.price)
                self.send(21, req_id, tick_type, 0, g.implied_vol, g.delta,
                          price_text(opt_price), 0.0, g.gamma, g.vega, g.theta,
                          price_text(g.und_price))

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
        3: on_place_order, 4: on_cancel_order, 8: on_req_ids, 16: on_all_open_orders, 17: on_managed_accounts,
        24: on_scanner_parameters, 54: on_calculate_implied_vol,
        55: on_calculate_option_price, 62: on_account_summary, 65: on_verify, 66: on_verify,
        67: on_query_display_groups, 68: on_subscribe_group_events,
        69: on_update_display_group, 72: on_verify, 73: on_verify, 74: on_positions_multi,
        78: on_sec_def_opt_params, 79: on_soft_dollar_tiers, 80: on_family_codes,
        81: on_matching_symbols, 82: on_depth_exchanges, 83: on_smart_components,
        85: on_news_providers, 91: on_market_rule, 94: on_pnl_single, 104: on_user_info,
    }
