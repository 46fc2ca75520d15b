"""The Client Portal Web API v1 side of the gateway simulator (``docs/ib-facts.md`` §6).

:class:`ClientPortal` is the API's behaviour; :class:`PortalServer` serves it over HTTP/1.1
(starlette routes from :mod:`~ktrdr_pipeline.simulator.http_app`, uvicorn), TLS by default
with a self-signed certificate for ``localhost``/``127.0.0.1`` generated at start; clients
verify against :attr:`PortalServer.cert_path`. Malformed requests get a 4xx from the HTTP
stack and the server keeps serving everyone else.

Endpoints, under ``/v1/api``:

- ``GET|POST /tickle`` and ``GET|POST /iserver/auth/status``: always authenticated.
- ``GET /portfolio/accounts`` (call first) and ``GET /portfolio/{accountId}/positions/{page}``
  (pages of up to 100 positions, from 0; past the end an empty list).
- ``GET /iserver/accounts`` (call before market data) and
  ``GET /iserver/marketdata/snapshot?conids=..&fields=..``;
  ``GET|POST /iserver/marketdata/unsubscribeall`` and ``POST /iserver/marketdata/unsubscribe``.

Behaviour chosen to match the real gateway:

- ``/portfolio/{accountId}/positions/{page}`` before ``/portfolio/accounts`` was called, and
  a snapshot before ``/iserver/accounts`` was called, answer HTTP 500 with
  ``{"error": "Please query /accounts first", "statusCode": 500}`` -- the text the real
  gateway uses, so clients that re-prime on it work unchanged.
- An unknown account answers 404 ``{"error": "Account ... not found", "statusCode": 404}``.
- The first snapshot of a conid only opens its market data line ("pre-flight"): the object
  has ``conid``, ``conidEx``, ``_updated`` and ``server_id`` but no field values; later
  snapshots carry the values. ``unsubscribe``/``unsubscribeall`` end the line again.
- An unknown (integer) conid yields an object with an ``"error"`` key and never values; a
  conid that is not an integer answers 400.
- ``_updated`` is the *simulator clock's* time (epoch ms) at which the values were
  computed, truncated to the millisecond, and all values of one snapshot are computed at
  exactly that instant: ``book.greeks(inst, <_updated as datetime>)`` reproduces them.

Values are strings as the real API returns them: prices and bid/ask exactly as the socket
API sends them, Greeks as plain decimals with 12 significant digits (the socket API's
``tickOptionComputation`` numbers), implied vol as ``"28.1%"``. Non-options have no Greeks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .account import AccountBook, price_text
from .http_app import PORTAL_PREFIX, ApiError, build_portal_app
from .http_server import HttpServer
from .tls import make_self_signed
from .universe import Instrument

log = logging.getLogger(__name__)

API_PREFIX = PORTAL_PREFIX
PAGE_SIZE = 100
MAX_SNAPSHOT_CONIDS = 500
SESSION_LENGTH_S = 24 * 3600
ACCOUNTS_FIRST = "Please query /accounts first"
SERVER_INFO = {"serverName": "KtrdrSim1", "serverVersion": "Build 10.30.1a, simulated"}
MAC = "00:00:5E:00:53:01"  # from the documentation range (RFC 7042)

#: Snapshot field ids this simulator serves.
LAST, BID, ASK, SYMBOL, CONID_FIELD, SEC_TYPE, UNDERLYING_CONID = (
    "31",
    "84",
    "86",
    "55",
    "6008",
    "6070",
    "6457",
)
AVAILABILITY, DELTA, GAMMA, THETA, VEGA, IMPLIED_VOL, MARK = (
    "6509",
    "7308",
    "7309",
    "7310",
    "7311",
    "7633",
    "7635",
)
GREEK_FIELDS = frozenset({DELTA, GAMMA, THETA, VEGA, IMPLIED_VOL})


# -- formatting ---------------------------------------------------------------------------
def decimal_text(x: float, significant: int = 12) -> str:
    """A plain decimal (never an exponent) with ``significant`` significant digits."""
    x = float(x)
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    decimals = min(max(significant - 1 - math.floor(math.log10(abs(x))), 0), 40)
    text = f"{x:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def epoch_ms(t: dt.datetime) -> int:
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(milliseconds=1)


def contract_desc(inst: Instrument) -> str:
    exp = inst.expiry_date
    if inst.sec_type == "OPT" and exp is not None:
        return (
            f"{inst.symbol} {exp:%b%Y}".upper() + f" {inst.strike:g} {inst.right} "
            f"[{inst.local_symbol} {inst.multiplier}]"
        )
    if inst.sec_type == "FUT" and exp is not None:
        return f"{inst.symbol} {exp:%b%Y}".upper()
    if inst.sec_type == "CASH":
        return inst.local_symbol
    return inst.symbol


Compute = Callable[..., Awaitable[Any]]


class ClientPortal:
    """The Client Portal Web API's behaviour: one method per endpoint, each returning the
    JSON payload of its 200 answer or raising :class:`~ktrdr_pipeline.simulator.http_app.ApiError`.

    Attributes: ``session`` (the session id), ``last_tickle`` (``time.time()`` of the last
    tickle, None before the first) and ``tickles``.
    """

    def __init__(self, book: AccountBook, compute: Compute | None = None):
        self.book = book
        self.session = secrets.token_hex(16)
        self.started = time.time()
        self.last_tickle: float | None = None
        self.tickles = 0
        self._compute = compute
        self._portfolio_primed = False
        self._iserver_primed = False
        self._lines: dict[int, str] = {}  # conid -> server_id of its open market data line

    def reset_session(self) -> None:
        """Forget the priming calls and market data lines, as after IB's nightly reset."""
        self._portfolio_primed = False
        self._iserver_primed = False
        self._lines.clear()
        self.session = secrets.token_hex(16)
        self.started = time.time()

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._compute is not None:
            return await self._compute(fn, *args)
        return fn(*args)

    # -- session -----------------------------------------------------------------------------
    async def tickle(self) -> Any:
        self.last_tickle = time.time()
        self.tickles += 1
        remaining = max(SESSION_LENGTH_S - (self.last_tickle - self.started), 0.0)
        return {
            "session": self.session,
            "ssoExpires": int(remaining * 1000),
            "collission": False,
            "userId": 1,
            "iserver": {"authStatus": self._auth_status_body()},
        }

    async def auth_status(self) -> Any:
        return self._auth_status_body()

    @staticmethod
    def _auth_status_body() -> dict[str, Any]:
        return {
            "authenticated": True,
            "competing": False,
            "connected": True,
            "message": "",
            "MAC": MAC,
            "serverInfo": dict(SERVER_INFO),
            "fail": "",
        }

    # -- accounts and positions --------------------------------------------------------------
    def _account_object(self) -> dict[str, Any]:
        acct = self.book.universe.account
        return {
            "id": acct,
            "accountId": acct,
            "accountVan": acct,
            "accountTitle": "Paper account",
            "displayName": acct,
            "accountAlias": None,
            "accountStatus": 1_600_000_000_000,
            "currency": "USD",
            "type": "DEMO",
            "tradingType": "PMRGN",
            "businessType": "IB_PROSERVE",
            "category": "",
            "ibEntity": "IBLLC-US",
            "faclient": False,
            "clearingStatus": "O",
            "covestor": False,
            "noClientTrading": False,
            "trackVirtualFXPortfolio": True,
            "brokerageAccess": True,
            "parent": {
                "mmc": [],
                "accountId": "",
                "isMParent": False,
                "isMChild": False,
                "isMultiplex": False,
            },
            "desc": acct,
        }

    async def portfolio_accounts(self) -> Any:
        self._portfolio_primed = True
        return [self._account_object()]

    async def positions(self, account: str, page: str | None) -> Any:
        acct = account
        if not self._portfolio_primed:
            raise ApiError(500, ACCOUNTS_FIRST)
        if acct != self.book.universe.account:
            raise ApiError(404, f"Account {acct} not found")
        page = page or "0"
        if not page.isdigit() or not page.isascii():
            raise ApiError(400, f"page must be a non-negative integer, not {page[:20]!r}")
        index = int(page)
        positions = self.book.universe.positions[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]
        if not positions:
            return []
        now = self.book.clock.now()
        rows = await self._run(self.book.portfolio, now)
        by_con = {r.inst.con_id: r for r in rows}
        wanted = {p.con_id for p in positions}
        return [
            self._position(by_con[c]) for c in [r.inst.con_id for r in rows] if c in wanted
        ]

    def _position(self, row: Any) -> dict[str, Any]:
        inst: Instrument = row.inst
        mult = inst.multiplier_value
        und = 0
        if inst.sec_type == "OPT":
            with contextlib.suppress(KeyError):
                und = self.book.underlying_of(inst).con_id
        desc = contract_desc(inst)
        return {
            "acctId": self.book.universe.account,
            "conid": inst.con_id,
            "contractDesc": desc,
            "position": float(row.position),
            "mktPrice": round(row.market_price, 6),
            "mktValue": round(row.market_value, 2),
            "currency": inst.currency,
            "avgCost": row.avg_cost,
            "avgPrice": round(row.avg_cost / mult, 8),
            "realizedPnl": 0.0,
            "unrealizedPnl": round(row.unrealized_pnl, 2),
            "exchs": None,
            "expiry": inst.expiry or None,
            "putOrCall": inst.right or None,
            "strike": float(inst.strike),
            "multiplier": mult if inst.multiplier else None,
            "exerciseStyle": "AMERICAN" if inst.sec_type == "OPT" else None,
            "conExchMap": [],
            "assetClass": inst.sec_type,
            "undConid": und,
            "model": "",
            "ticker": inst.symbol,
            "name": inst.long_name,
            "fullName": desc,
            "listingExchange": inst.primary_exchange or inst.exchange,
        }

    async def iserver_accounts(self) -> Any:
        self._iserver_primed = True
        acct = self.book.universe.account
        return {
            "accounts": [acct],
            "acctProps": {
                acct: {
                    "hasChildAccounts": False,
                    "supportsCashQty": True,
                    "noFXConv": True,
                    "isProp": False,
                    "supportsFractions": True,
                    "allowCustomerTime": False,
                }
            },
            "aliases": {acct: acct},
            "allowFeatures": {"showGFIS": True, "allowCrypto": False},
            "chartPeriods": {},
            "groups": [],
            "profiles": [],
            "selectedAccount": acct,
            "serverInfo": dict(SERVER_INFO),
            "sessionId": self.session,
            "isFT": False,
            "isPaper": True,
        }

    # -- market data -------------------------------------------------------------------------
    async def snapshot(self, conids_text: str | None, fields_text: str | None) -> Any:
        if not self._iserver_primed:
            raise ApiError(500, ACCOUNTS_FIRST)
        conids: list[int] = []
        for text in (conids_text or "").split(","):
            text = text.strip()
            if not text:
                continue
            if not text.isdigit() or not text.isascii():
                raise ApiError(400, f"conids must be integers, not {text[:20]!r}")
            if int(text) not in conids:
                conids.append(int(text))
        if not conids:
            raise ApiError(400, "Missing required parameter conids")
        if len(conids) > MAX_SNAPSHOT_CONIDS:
            raise ApiError(400, f"at most {MAX_SNAPSHOT_CONIDS} conids per snapshot")
        fields = [f.strip() for f in (fields_text or "").split(",") if f.strip()]
        now = self.book.clock.now()
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # _updated is exact
        stamp = epoch_ms(now)
        out: list[dict[str, Any]] = []
        ready: list[tuple[dict[str, Any], Instrument]] = []
        for conid in conids:
            inst = self.book.universe.instruments.get(conid)
            first = conid not in self._lines
            if first:
                self._lines[conid] = f"q{len(self._lines)}"
            obj: dict[str, Any] = {
                "conid": conid,
                "conidEx": str(conid),
                "_updated": stamp,
                "server_id": self._lines[conid],
            }
            if inst is None:
                obj["error"] = f"Invalid conid {conid}"
            elif not first:
                ready.append((obj, inst))
            out.append(obj)
        if ready and fields:
            values = await self._run(self._values, [i for _, i in ready], fields, now)
            for (obj, _), vals in zip(ready, values, strict=True):
                obj.update(vals)
        return out

    def _values(
        self, insts: list[Instrument], fields: list[str], now: dt.datetime
    ) -> list[dict[str, str]]:
        return [self._field_values(inst, fields, now) for inst in insts]

    def _field_values(
        self, inst: Instrument, fields: list[str], now: dt.datetime
    ) -> dict[str, str]:
        """The requested fields of one instrument, computed as the socket API does."""
        book = self.book
        q = book.quote(inst, now)
        price, bid, ask, g = q.price, q.bid, q.ask, q.greeks
        und = ""
        if inst.sec_type == "OPT":
            with contextlib.suppress(KeyError):
                und = str(book.underlying_of(inst).con_id)
        available: dict[str, str] = {
            LAST: price_text(price),
            BID: price_text(bid),
            ASK: price_text(ask),
            MARK: price_text(price),
            SYMBOL: inst.symbol,
            CONID_FIELD: str(inst.con_id),
            SEC_TYPE: inst.sec_type,
            AVAILABILITY: "RpB",
        }
        if und:
            available[UNDERLYING_CONID] = und
        if g is not None:
            available.update(
                {
                    DELTA: decimal_text(g.delta),
                    GAMMA: decimal_text(g.gamma),
                    THETA: decimal_text(g.theta),
                    VEGA: decimal_text(g.vega),
                    IMPLIED_VOL: f"{g.implied_vol * 100:.1f}%",
                }
            )
            available = {
                k: v
                for k, v in available.items()
                if k not in GREEK_FIELDS or v not in ("nan", "inf", "-inf")
            }
        return {f: available[f] for f in fields if f in available}

    async def unsubscribe_all(self) -> Any:
        self._lines.clear()
        return {"unsubscribed": True}

    async def unsubscribe(self, body: Any) -> Any:
        conid = body.get("conid") if isinstance(body, dict) else None
        try:
            conid = int(conid)
        except (TypeError, ValueError):
            raise ApiError(400, 'body must be {"conid": <integer>}') from None
        if self._lines.pop(conid, None) is None:
            raise ApiError(404, f"no market data line for conid {conid}")
        return {"success": True}


class PortalServer:
    """A running Client Portal Web API simulator; see the module docstring.

    Attributes: ``port`` (the bound port), ``cert_path`` (PEM of the self-signed
    certificate to verify against; None for plain HTTP), ``base_url``, ``api`` (the
    :class:`ClientPortal`), and from it ``last_tickle``, ``tickles`` and ``session``.
    """

    def __init__(
        self, book: AccountBook, host: str, tls: bool = True, compute: Compute | None = None
    ):
        self.api = ClientPortal(book, compute)
        self.host = host
        self.tls = tls
        self.port = 0
        self.cert_path: Path | None = None
        self.key_path: Path | None = None
        self._tmpdir: str | None = None
        self._http: HttpServer | None = None

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}{API_PREFIX}"

    @property
    def last_tickle(self) -> float | None:
        return self.api.last_tickle

    @property
    def tickles(self) -> int:
        return self.api.tickles

    @property
    def session(self) -> str:
        return self.api.session

    def reset_session(self) -> None:
        """Forget the priming calls and market data lines, as after IB's nightly reset."""
        self.api.reset_session()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, port: int) -> PortalServer:
        try:
            if self.tls:
                self._tmpdir = tempfile.mkdtemp(prefix="ktrdr-portal-")
                self.cert_path, self.key_path = make_self_signed(Path(self._tmpdir), self.host)
            self._http = HttpServer(build_portal_app(self.api), self.host, port,
                                    certfile=self.cert_path, keyfile=self.key_path,
                                    name="client portal simulator")
            self.port = self._http.port
            await self._http.start()
        except BaseException:
            self._remove_tmpdir()
            raise
        return self

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.stop()
            self._http = None
        self._remove_tmpdir()

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


async def start_portal(
    book: AccountBook, host: str, port: int, tls: bool = True, compute: Compute | None = None
) -> PortalServer:
    """Start the Client Portal Web API simulator on ``host:port`` (0 = any free port).

    ``compute(fn, *args)``, if given, runs market-model work (e.g. the gateway's single
    market worker, ``GatewayServer.compute``); otherwise it runs on the event loop.
    """
    return await PortalServer(book, host, tls=tls, compute=compute).start(port)
