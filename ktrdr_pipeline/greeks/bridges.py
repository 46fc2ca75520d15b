"""The two ways to read the portfolio's Greeks from IB; both return a :class:`Snapshot`.

``SocketBridge`` (``IB_API_MODE=SOCKET``) talks the TWS API through ib_async: the account's
positions (``reqPositions``, kept current by ib_async), then one streaming market data line
per position (``reqMktData``): model Greeks (tick 13) for options, the price for the
rest. A disconnect hands over to the :class:`~.watchdog.Watchdog`.

``PortalBridge`` (``IB_API_MODE=PORTAL``) talks the Client Portal Web API over HTTPS with
``requests``: ``/tickle`` about every 60 s to keep the session, ``/portfolio/accounts``
then ``/portfolio/{acct}/positions/{page}`` (every page), ``/iserver/accounts``, then
``/iserver/marketdata/snapshot`` -- whose first call for a conid only opens the line
(the "pre-flight"), so it is called again until the values arrive. TLS is verified by
default (``IB_PORTAL_VERIFY``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import requests
from ib_async import Contract, Ticker

from ..domain import ib_rules
from ..ib.connection import IBConnection, ResetWindow
from ..ib.errors import GatewayUnreachable
from .config import GreeksConfig
from .model import PositionGreeks, Snapshot, clean_greek, clean_price
from .store import GreeksStore
from .watchdog import BACKOFF_S, Watchdog

log = logging.getLogger(__name__)



class BridgeUnavailable(Exception):
    """IB cannot be reached right now; the tick is skipped."""


class Bridge(Protocol):
    mode: str

    @property
    def available(self) -> bool: ...

    async def start(self) -> None: ...

    async def snapshot(self, tick_time: datetime) -> Snapshot: ...

    async def close(self) -> None: ...


def _multiplier(text: Any) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return 1.0
    return value if value > 0 and math.isfinite(value) else 1.0


def _now() -> datetime:
    return datetime.now(UTC)


# -- socket ------------------------------------------------------------------------------------
class SocketBridge:
    """Positions and model Greeks over the TWS socket API (ib_async)."""

    mode = "SOCKET"

    def __init__(
        self,
        config: GreeksConfig,
        store: GreeksStore,
        *,
        connection: IBConnection | None = None,
        greeks_timeout: float = 3.0,
        keep_trying: bool = True,
        watchdog: Watchdog | None = None,
        backoff: tuple[float, ...] = BACKOFF_S,
        now: Callable[[], datetime] = _now,
    ):
        self.config = config
        self.store = store
        self.conn = connection or IBConnection.from_settings(
            config.settings, attempts=1, connect_timeout=10)
        self.ib = self.conn.ib
        self.greeks_timeout = greeks_timeout
        self.keep_trying = keep_trying
        self.now = now
        window = ResetWindow.parse(config.settings.reset_window)
        self.watchdog = watchdog or Watchdog(self._connect, self._log_event, window=window,
                                             backoff=backoff)
        self._tickers: dict[int, Ticker] = {}
        self._recovery: asyncio.Task | None = None
        self._closing = False
        self._live = False  # connected at least once: a disconnect is then a drop
        self._last_error: tuple[int, str] | None = None
        self.account = ""

    # -- events ------------------------------------------------------------------------------
    def _log_event(self, event: str, **fields: Any) -> None:
        self.store.log_event(event, mode=self.mode, **fields)

    def _on_error(self, req_id: int, code: int, message: str, contract: Any) -> None:
        if code in ib_rules.INFO_CODES:
            return
        if (code, message) == self._last_error:
            return  # one row per distinct error in a row, not one per tick
        self._last_error = (code, message)
        what = f" ({contract.localSymbol or contract.symbol})" if contract else ""
        self._log_event("error", code=code, message=f"{message}{what}")

    def _on_disconnected(self) -> None:
        self._tickers.clear()
        if self._closing or not self._live:
            return  # closing, or a connect attempt that failed (e.g. client id in use)
        if self._recovery is not None and not self._recovery.done():
            return  # a failed reconnect attempt; the watchdog is on it
        log.warning("socket bridge disconnected from %s:%d; the watchdog reconnects",
                    self.conn.host, self.conn.port)
        self._log_event("disconnect", message=f"{self.conn.host}:{self.conn.port}")
        self._start_recovery("disconnected")

    def _on_restored(self, req_id: int, code: int, message: str, contract: Any) -> None:
        """ib_async's own 1102 handler (``IB._onError``), with its request's outcome kept.

        On 1102 ("connectivity restored") ib_async re-requests the account summary and
        drops the request's future. If the socket closes before the answer (a nightly
        reset ending in a close; the simulator never answers it), ib_async fails that
        future with ``ConnectionError('Socket disconnect')`` and, nobody having awaited
        it, asyncio logs "Future exception was never retrieved" at ERROR. The bridge reads
        positions and model Greeks, never the summary: the request is made as before, and
        a failure is only noted at DEBUG (the disconnect itself is logged and recovered)."""
        if code != ib_rules.ERR_RESTORED_DATA_MAINTAINED:
            return
        try:
            request = asyncio.ensure_future(self.ib.reqAccountSummaryAsync())
        except (ConnectionError, RuntimeError) as exc:  # not connected, or no running loop
            log.debug("account summary not re-requested after 1102: %r", exc)
            return
        request.add_done_callback(_retrieve_outcome)

    def _start_recovery(self, reason: str) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to recover for
            self._recovery = asyncio.get_running_loop().create_task(
                self.watchdog.recover(reason))

    # -- lifecycle ---------------------------------------------------------------------------
    async def _connect(self) -> None:
        await self.conn.connect()
        self._tickers.clear()
        accounts = self.ib.managedAccounts()
        self.account = accounts[0] if accounts else ""
        self._last_error = None
        self._live = True
        await self._subscribe()  # open the lines now: the first tick finds values

    async def start(self) -> None:
        self.ib.errorEvent += self._on_error
        self.ib.errorEvent -= self.ib._onError  # replaced by _on_restored (see there)
        self.ib.errorEvent += self._on_restored
        self.ib.disconnectedEvent += self._on_disconnected
        try:
            await self._connect()
        except GatewayUnreachable as exc:
            self._log_event("error", message=str(exc))
            if not self.keep_trying:
                raise BridgeUnavailable(str(exc)) from exc
            log.warning("%s; the watchdog keeps trying", exc)
            self._start_recovery("initial connect failed")
            return
        self._log_event("connect", message=f"{self.conn.host}:{self.conn.port} client "
                                           f"{self.conn.status_info.client_id}")

    @property
    def available(self) -> bool:
        return self.ib.isConnected()

    async def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ib.isConnected() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.ib.isConnected()

    async def close(self) -> None:
        self._closing = True
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._recovery
        was_connected = self.ib.isConnected()
        await self.conn.disconnect()
        self.ib.errorEvent -= self._on_error
        self.ib.errorEvent -= self._on_restored
        self.ib.errorEvent += self.ib._onError
        self.ib.disconnectedEvent -= self._on_disconnected
        if was_connected:
            self._log_event("disconnect", message="closed by the bridge")

    # -- snapshot ----------------------------------------------------------------------------
    async def _market_contract(self, contract: Contract) -> Contract:
        exchange = contract.exchange
        if not exchange:  # real position messages often leave it empty
            exchange = "SMART"
            if contract.secType not in ("STK", "OPT"):
                with contextlib.suppress(Exception):
                    details = await asyncio.wait_for(
                        self.ib.reqContractDetailsAsync(Contract(conId=contract.conId)), 5)
                    if details:
                        exchange = details[0].contract.exchange or exchange
        return Contract(conId=contract.conId, exchange=exchange)

    async def _subscribe(self) -> list[Any]:
        """The account's non-zero positions, each with its market data line open."""
        held = [p for p in self.ib.positions(self.account) if p.position != 0]
        wanted = {p.contract.conId for p in held}
        for con_id in [c for c in self._tickers if c not in wanted]:
            with contextlib.suppress(Exception):
                self.ib.cancelMktData(self._tickers.pop(con_id).contract)
        for p in held:
            if p.contract.conId not in self._tickers:
                contract = await self._market_contract(p.contract)
                self._tickers[p.contract.conId] = self.ib.reqMktData(contract)
        return held

    async def snapshot(self, tick_time: datetime) -> Snapshot:
        if not self.ib.isConnected():
            raise BridgeUnavailable("not connected to IB Gateway/TWS")
        held = await self._subscribe()
        options = [p.contract.conId for p in held if p.contract.secType in ("OPT", "FOP")]
        deadline = time.monotonic() + self.greeks_timeout
        while time.monotonic() < deadline and self.ib.isConnected():
            if all(_has_greeks(self._tickers[c]) for c in options):
                break
            await asyncio.sleep(0.01)
        if not self.ib.isConnected():
            raise BridgeUnavailable("disconnected while reading market data")
        taken = self.now()
        rows = []
        newest: datetime | None = None
        for p in held:
            c = p.contract
            ticker = self._tickers[c.conId]
            common = dict(con_id=c.conId, symbol=c.symbol, sec_type=c.secType,
                          position=float(p.position), multiplier=_multiplier(c.multiplier),
                          local_symbol=c.localSymbol, expiry=c.lastTradeDateOrContractMonth,
                          strike=float(c.strike) if c.strike else None, right=c.right)
            if c.secType in ("OPT", "FOP"):
                g = ticker.modelGreeks
                if g is not None and ticker.time is not None:
                    newest = ticker.time if newest is None else max(newest, ticker.time)
                rows.append(PositionGreeks(
                    **common,
                    unit_delta=clean_greek(g.delta) if g else None,
                    unit_gamma=clean_greek(g.gamma) if g else None,
                    unit_vega=clean_greek(g.vega) if g else None,
                    unit_theta=clean_greek(g.theta) if g else None,
                    implied_vol=clean_price(g.impliedVol) if g else None,
                    underlying_price=clean_price(g.undPrice) if g else None,
                ))
            else:
                rows.append(PositionGreeks.non_option(
                    **common, underlying_price=clean_price(ticker.marketPrice())))
        return Snapshot(account=self.account, mode=self.mode, tick_time=tick_time,
                        snapshot_time=taken, positions=tuple(rows), data_time=newest)


def _retrieve_outcome(request: asyncio.Future) -> None:
    """Retrieve a fire-and-forget request's outcome, so that its failure (the socket
    closed before the answer) is not logged as "never retrieved"."""
    if not request.cancelled() and request.exception() is not None:
        log.debug("account summary request ended: %r", request.exception())


def _has_greeks(ticker: Ticker) -> bool:
    g = ticker.modelGreeks
    return g is not None and all(
        clean_greek(v) is not None for v in (g.delta, g.gamma, g.vega, g.theta))


# -- Client Portal -----------------------------------------------------------------------------
ACCOUNTS_FIRST = "query /accounts first"
PAGE_SIZE = 100
LAST, DELTA, GAMMA, THETA, VEGA, IMPLIED_VOL, UNDERLYING = (
    "31", "7308", "7309", "7310", "7311", "7633", "6457")
SNAPSHOT_FIELDS = ",".join((LAST, DELTA, GAMMA, THETA, VEGA, IMPLIED_VOL, UNDERLYING))
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def portal_number(value: Any) -> float | None:
    """A Client Portal value: numbers come as strings, prices may carry a prefix (``C`` for
    a previous close, ``H`` halted), implied vol as ``"28.1%"``."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        x = float(value)
        return x if math.isfinite(x) else None
    text = str(value).strip().replace(",", "")
    m = _NUMBER.search(text)
    if not m:
        return None
    x = float(m.group(0))
    if not math.isfinite(x):
        return None
    return x / 100.0 if text.endswith("%") else x


class PortalError(Exception):
    """An unexpected answer from the Client Portal API."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class PortalClient:
    """A thin synchronous Client Portal Web API v1 client (``requests``)."""

    def __init__(self, base_url: str, verify: bool | str = True, *, timeout: float = 10.0,
                 session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self.verify = verify
        self.timeout = timeout
        self.http = session or requests.Session()
        self.http.headers.setdefault("User-Agent", "ktrdr-pipeline")
        if verify is False:
            with contextlib.suppress(Exception):
                from urllib3.exceptions import InsecureRequestWarning

                requests.packages.urllib3.disable_warnings(InsecureRequestWarning)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.http.request(method, self.base_url + path, verify=self.verify,
                                  timeout=self.timeout, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise BridgeUnavailable(
                f"TLS verification of {self.base_url} failed ({exc}); point IB_PORTAL_VERIFY "
                "at the gateway's certificate (or set it to 'false' to turn verification "
                "off)") from exc
        except requests.exceptions.RequestException as exc:
            raise BridgeUnavailable(f"cannot reach the Client Portal at {self.base_url}: "
                                    f"{exc}") from exc
        try:
            body = r.json() if r.content else None
        except ValueError:
            body = None
        if r.status_code >= 400:
            message = body.get("error") if isinstance(body, dict) else r.text[:200]
            if r.status_code == 401:
                raise BridgeUnavailable(f"the Client Portal session is not authenticated "
                                        f"({message}); log in at the gateway")
            raise PortalError(r.status_code, str(message))
        return body

    def tickle(self) -> dict[str, Any]:
        return self.request("POST", "/tickle") or {}

    def portfolio_accounts(self) -> list[str]:
        body = self.request("GET", "/portfolio/accounts") or []
        return [a.get("accountId") or a.get("id") for a in body if isinstance(a, dict)]

    def positions(self, account: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        page = 0
        while True:
            rows = self.request("GET", f"/portfolio/{account}/positions/{page}") or []
            out.extend(r for r in rows if isinstance(r, dict))
            if len(rows) < PAGE_SIZE:
                return out
            page += 1

    def iserver_accounts(self) -> dict[str, Any]:
        return self.request("GET", "/iserver/accounts") or {}

    def snapshot(self, conids: list[int], fields: str) -> list[dict[str, Any]]:
        body = self.request("GET", "/iserver/marketdata/snapshot",
                            params={"conids": ",".join(map(str, conids)), "fields": fields})
        return [o for o in body or [] if isinstance(o, dict)]

    def close(self) -> None:
        self.http.close()


class PortalBridge:
    """Positions and Greeks over the Client Portal Web API."""

    mode = "PORTAL"

    def __init__(
        self,
        config: GreeksConfig,
        store: GreeksStore,
        *,
        client: PortalClient | None = None,
        greeks_timeout: float = 3.0,
        retry_delay: float = 0.2,
        tickle_interval: float = 60.0,
        now: Callable[[], datetime] = _now,
    ):
        self.config = config
        self.store = store
        self.client = client or PortalClient(config.portal_url, config.portal_verify)
        self.greeks_timeout = greeks_timeout
        self.retry_delay = retry_delay
        self.tickle_interval = tickle_interval
        self.now = now
        self.account = ""
        self._primed = False
        self._last_tickle = float("-inf")
        self._ok = False
        self._last_error = ""
        self.tickles = 0

    def _log_event(self, event: str, **fields: Any) -> None:
        self.store.log_event(event, mode=self.mode, **fields)

    @property
    def available(self) -> bool:
        return True  # every snapshot tries; there is no connection to wait for

    async def start(self) -> None:
        if self.config.portal_verify is False:
            log.warning("TLS verification of %s is OFF (IB_PORTAL_VERIFY=false)",
                        self.config.portal_url)
        try:
            await asyncio.to_thread(self._warm_up)
        except (BridgeUnavailable, PortalError) as exc:
            self._failed(exc)

    def _warm_up(self) -> None:
        """Session, accounts, and the pre-flight snapshot that opens the market data
        lines, so the first tick finds values."""
        self._ensure_session()
        conids = self._conids(self._call(lambda: self.client.positions(self.account)))
        if conids:
            self._call(lambda: self.client.snapshot(conids, SNAPSHOT_FIELDS))

    async def snapshot(self, tick_time: datetime) -> Snapshot:
        try:
            return await asyncio.to_thread(self._snapshot, tick_time)
        except (BridgeUnavailable, PortalError) as exc:
            self._failed(exc)
            raise BridgeUnavailable(str(exc)) from exc

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close)
        if self._ok:
            self._log_event("disconnect", message="closed by the bridge")
        self._ok = False

    # -- session -----------------------------------------------------------------------------
    def _failed(self, exc: BaseException) -> None:
        text = str(exc)[:2000]
        if self._ok:
            self._log_event("disconnect", message=text)
        if text != self._last_error:
            log.warning("client portal: %s", text)
            self._log_event("error", message=text)
        self._last_error = text
        self._ok = False
        self._primed = False

    def _tickle(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_tickle < self.tickle_interval:
            return
        body = self.client.tickle()
        self._last_tickle = time.monotonic()
        self.tickles += 1
        auth = (body.get("iserver") or {}).get("authStatus") or {}
        if auth and not auth.get("authenticated", False):
            raise BridgeUnavailable("the Client Portal session is not authenticated; log in "
                                    "at the gateway")

    def _prime(self) -> None:
        accounts = self.client.portfolio_accounts()  # must come first
        if not accounts:
            raise BridgeUnavailable("the Client Portal lists no account")
        self.account = accounts[0]
        self.client.iserver_accounts()  # must precede market data
        self._primed = True

    def _ensure_session(self) -> None:
        self._tickle(force=not self._ok)
        if not self._primed:
            self._prime()
        if not self._ok:
            self._ok = True
            self._last_error = ""
            self._log_event("connect", message=f"{self.config.portal_url} account "
                                               f"{self.account}")

    def _call(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, priming again once if the gateway forgot the session (its
        "Please query /accounts first" answer, e.g. after the nightly reset)."""
        try:
            return fn()
        except PortalError as exc:
            if ACCOUNTS_FIRST not in exc.message.lower():
                raise
            log.info("client portal asks for /accounts first; priming again")
            self._prime()
            return fn()

    @staticmethod
    def _conids(positions: list[dict[str, Any]]) -> list[int]:
        """The positions' conids and their underlyings' (for the underlying price)."""
        conids: list[int] = []
        for p in positions:
            if not portal_number(p.get("position")):
                continue
            for c in (p.get("conid"), p.get("undConid")):
                if c and int(c) not in conids:
                    conids.append(int(c))
        return conids

    def _snapshot(self, tick_time: datetime) -> Snapshot:
        self._ensure_session()
        positions = [p for p in self._call(lambda: self.client.positions(self.account))
                     if portal_number(p.get("position"))]
        conids = self._conids(positions)
        options = [int(p["conid"]) for p in positions if p.get("assetClass") in ("OPT", "FOP")]
        values: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + self.greeks_timeout
        while conids:
            data = self._call(lambda: self.client.snapshot(conids, SNAPSHOT_FIELDS))
            values = {int(o["conid"]): o for o in data if "conid" in o}
            if all(_portal_has_greeks(values.get(c, {})) for c in options) and all(
                    LAST in values.get(c, {}) or "error" in values.get(c, {}) for c in conids):
                break
            if time.monotonic() + self.retry_delay > deadline:
                break
            time.sleep(self.retry_delay)
        taken = self.now()
        stamps = [int(values[c]["_updated"]) for c in options
                  if c in values and _portal_has_greeks(values[c]) and "_updated" in values[c]]
        rows = []
        for p in positions:
            conid = int(p["conid"])
            v = values.get(conid, {})
            sec_type = str(p.get("assetClass") or "")
            und = p.get("undConid")
            und_v = values.get(int(und), {}) if und else v
            common = dict(
                con_id=conid, symbol=str(p.get("ticker") or p.get("contractDesc") or ""),
                sec_type=sec_type, position=float(portal_number(p.get("position")) or 0.0),
                multiplier=_multiplier(p.get("multiplier")),
                local_symbol=str(p.get("contractDesc") or ""),
                expiry=str(p.get("expiry") or ""), strike=portal_number(p.get("strike")),
                right=str(p.get("putOrCall") or ""))
            if sec_type in ("OPT", "FOP"):
                rows.append(PositionGreeks(
                    **common,
                    unit_delta=portal_number(v.get(DELTA)),
                    unit_gamma=portal_number(v.get(GAMMA)),
                    unit_vega=portal_number(v.get(VEGA)),
                    unit_theta=portal_number(v.get(THETA)),
                    implied_vol=portal_number(v.get(IMPLIED_VOL)),
                    underlying_price=clean_price(portal_number(und_v.get(LAST))),
                ))
            else:
                rows.append(PositionGreeks.non_option(
                    **common, underlying_price=clean_price(portal_number(v.get(LAST)))))
        data_time = datetime.fromtimestamp(max(stamps) / 1000, UTC) if stamps else None
        return Snapshot(account=self.account, mode=self.mode, tick_time=tick_time,
                        snapshot_time=taken, positions=tuple(rows), data_time=data_time)


def _portal_has_greeks(obj: dict[str, Any]) -> bool:
    return all(portal_number(obj.get(f)) is not None for f in (DELTA, GAMMA, THETA, VEGA))


def make_bridge(config: GreeksConfig, store: GreeksStore, **kwargs: Any) -> Bridge:
    """The bridge ``IB_API_MODE`` selects."""
    if config.mode == "SOCKET":
        return SocketBridge(config, store, **kwargs)
    if config.mode == "PORTAL":
        return PortalBridge(config, store, **kwargs)
    raise ValueError(f"IB_API_MODE must be one of SOCKET, PORTAL, got {config.mode!r}")
