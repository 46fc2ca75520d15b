"""The Client Portal Web API v1 side of the gateway simulator (``shared/ib-facts.md`` §6).

A small HTTP/1.1 server on :func:`asyncio.start_server` (no web framework): keep-alive,
``Content-Length`` and chunked request bodies, JSON answers. TLS by default, with a
self-signed certificate for ``localhost``/``127.0.0.1`` generated at start; clients verify
against :attr:`PortalServer.cert_path`. Malformed requests get ``400`` (the connection is
then closed, since its framing is lost) and the server keeps serving everyone else.

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

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import math
import re
import secrets
import shutil
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .account import AccountBook, price_text
from .universe import Instrument

log = logging.getLogger(__name__)

API_PREFIX = "/v1/api"
PAGE_SIZE = 100
MAX_LINE_BYTES = 16 * 1024
MAX_HEADERS = 100
MAX_BODY_BYTES = 1 << 20
MAX_SNAPSHOT_CONIDS = 500
IDLE_TIMEOUT_S = 60.0
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

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(r"^HTTP/(\d)\.(\d)$")


class HttpError(Exception):
    """An error answer: ``status`` with ``{"error": message, "statusCode": status}``."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.close = close


@dataclass
class Request:
    method: str
    target: str
    version: tuple[int, int]
    headers: dict[str, str]
    body: bytes = b""
    path: str = ""
    query: dict[str, list[str]] = field(default_factory=dict)

    @property
    def keep_alive(self) -> bool:
        conn = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version >= (1, 1):
            return "close" not in conn
        return "keep-alive" in conn

    def json(self) -> Any:
        if not self.body.strip():
            return None
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise HttpError(400, f"request body is not valid JSON: {exc}") from None

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return ",".join(values) if values else None


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


# -- TLS ----------------------------------------------------------------------------------
def make_self_signed(directory: Path, host: str) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) for localhost, 127.0.0.1, ::1 and ``host``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ktrdr gateway simulator"),
        ]
    )
    alt: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    if host and host not in ("localhost", "127.0.0.1", "::1", "0.0.0.0", "::"):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    pub = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pub), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "portal-cert.pem", directory / "portal-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# -- HTTP parsing -------------------------------------------------------------------------
async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise HttpError(400, "request line or header too long", close=True) from None


async def read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> Request | None:
    """The next request on a connection, or None at a clean end of the stream."""
    try:
        line = await _read_line(reader)
        for _ in range(8):  # RFC 9112 §2.2: ignore empty lines before a request line
            if line.strip():
                break
            line = await _read_line(reader)
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise HttpError(400, "incomplete request line", close=True) from None
        return None
    try:
        text = line.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise HttpError(400, "request line is not ASCII", close=True) from None
    parts = text.split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
        raise HttpError(400, f"malformed request line {text[:80]!r}", close=True)
    method, target, version_text = parts
    m = _VERSION.match(version_text)
    if not m:
        raise HttpError(400, f"malformed HTTP version {version_text[:20]!r}", close=True)
    version = (int(m.group(1)), int(m.group(2)))
    if version[0] != 1:
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported", close=True)
    if not target.startswith("/"):
        raise HttpError(400, f"request target must be a path: {target[:80]!r}", close=True)

    headers: dict[str, str] = {}
    try:
        for _ in range(MAX_HEADERS + 1):
            raw = await _read_line(reader)
            if raw in (b"\r\n", b"\n"):
                break
            try:
                hline = raw.decode("latin-1").rstrip("\r\n")
            except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
                raise HttpError(400, "bad header", close=True) from None
            name, sep, value = hline.partition(":")
            if not sep or not _TOKEN.match(name):
                raise HttpError(400, f"malformed header line {hline[:80]!r}", close=True)
            key, value = name.lower(), value.strip()
            if key in headers:
                if key in ("content-length", "host") and headers[key] != value:
                    raise HttpError(400, f"conflicting {name} headers", close=True)
                headers[key] = f"{headers[key]}, {value}" if key != "content-length" else value
            else:
                headers[key] = value
        else:
            raise HttpError(431, "too many header fields", close=True)
    except asyncio.IncompleteReadError:
        raise HttpError(400, "incomplete request headers", close=True) from None

    req = Request(method, target, version, headers)
    if "transfer-encoding" in headers:
        codings = [c.strip().lower() for c in headers["transfer-encoding"].split(",")]
        if codings[-1] != "chunked" or any(c not in ("chunked", "identity") for c in codings):
            raise HttpError(
                501, f"unsupported transfer-encoding {headers['transfer-encoding']!r}", close=True
            )
        if "content-length" in headers:
            raise HttpError(400, "both Transfer-Encoding and Content-Length", close=True)
        _continue(req, writer)
        req.body = await _read_chunked(reader)
    elif "content-length" in headers:
        text = headers["content-length"]
        if not text.isdigit() or not text.isascii():
            raise HttpError(400, f"invalid Content-Length {text[:20]!r}", close=True)
        length = int(text)
        if length > MAX_BODY_BYTES:
            raise HttpError(413, f"request body over {MAX_BODY_BYTES} bytes", close=True)
        _continue(req, writer)
        try:
            req.body = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise HttpError(400, "incomplete request body", close=True) from None

    try:
        split = urlsplit(target)
        req.path = unquote(split.path, errors="strict")
        req.query = parse_qs(split.query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, f"malformed request target {target[:80]!r}") from None
    return req


def _continue(req: Request, writer: asyncio.StreamWriter) -> None:
    if req.version >= (1, 1) and req.headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    try:
        while True:
            size_line = (await _read_line(reader)).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise HttpError(400, "malformed chunk size", close=True) from None
            if size < 0 or len(body) + size > MAX_BODY_BYTES:
                raise HttpError(413, f"request body over {MAX_BODY_BYTES} bytes", close=True)
            if size == 0:
                for _ in range(MAX_HEADERS + 1):  # trailers
                    if (await _read_line(reader)) in (b"\r\n", b"\n"):
                        return bytes(body)
                raise HttpError(431, "too many trailer fields", close=True)
            body += await reader.readexactly(size)
            if (await reader.readexactly(2)) != b"\r\n":
                raise HttpError(400, "malformed chunk", close=True)
    except asyncio.IncompleteReadError:
        raise HttpError(400, "incomplete chunked body", close=True) from None


def render(status: int, payload: Any, keep_alive: bool, head: bool = False) -> bytes:
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(body)}",
        f"Date: {formatdate(usegmt=True)}",
        "Server: ktrdr-client-portal-simulator",
        "Cache-Control: no-cache, no-store",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head else body)


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": message, "statusCode": status}


# -- the server ---------------------------------------------------------------------------
Compute = Callable[..., Awaitable[Any]]

_ROUTES: list[tuple[re.Pattern[str], frozenset[str], str]] = [
    (re.compile(r"/tickle"), frozenset({"GET", "POST"}), "tickle"),
    (re.compile(r"/iserver/auth/status"), frozenset({"GET", "POST"}), "auth_status"),
    (re.compile(r"/portfolio/accounts"), frozenset({"GET"}), "portfolio_accounts"),
    (
        re.compile(r"/portfolio/(?P<acct>[^/]+)/positions(?:/(?P<page>[^/]*))?"),
        frozenset({"GET"}),
        "positions",
    ),
    (re.compile(r"/iserver/accounts"), frozenset({"GET"}), "iserver_accounts"),
    (re.compile(r"/iserver/marketdata/snapshot"), frozenset({"GET"}), "snapshot"),
    (
        re.compile(r"/iserver/marketdata/unsubscribeall"),
        frozenset({"GET", "POST"}),
        "unsubscribe_all",
    ),
    (re.compile(r"/iserver/marketdata/unsubscribe"), frozenset({"POST"}), "unsubscribe"),
]


class PortalServer:
    """A running Client Portal Web API simulator; see the module docstring.

    Attributes: ``port`` (the bound port), ``cert_path`` (PEM of the self-signed
    certificate to verify against; None for plain HTTP), ``base_url``, ``last_tickle``
    (``time.time()`` of the last tickle, None before the first) and ``tickles``.
    """

    def __init__(
        self, book: AccountBook, host: str, tls: bool = True, compute: Compute | None = None
    ):
        self.book = book
        self.host = host
        self.tls = tls
        self.port = 0
        self.cert_path: Path | None = None
        self.key_path: Path | None = None
        self.session = secrets.token_hex(16)
        self.started = time.time()
        self.last_tickle: float | None = None
        self.tickles = 0
        self._compute = compute
        self._tmpdir: str | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._portfolio_primed = False
        self._iserver_primed = False
        self._lines: dict[int, str] = {}  # conid -> server_id of its open market data line

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}{API_PREFIX}"

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, port: int) -> PortalServer:
        context = None
        if self.tls:
            self._tmpdir = tempfile.mkdtemp(prefix="ktrdr-portal-")
            self.cert_path, self.key_path = make_self_signed(Path(self._tmpdir), self.host)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(self.cert_path, self.key_path)
        try:
            self._server = await asyncio.start_server(
                self._on_connect,
                self.host,
                port,
                ssl=context,
                limit=MAX_LINE_BYTES,
                ssl_handshake_timeout=10 if context else None,
            )
        except BaseException:
            self._remove_tmpdir()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("client portal simulator listening on %s", self.base_url)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            tasks = list(self._connections)
            for task, writer in list(self._connections.items()):
                with contextlib.suppress(Exception):
                    writer.transport.abort()  # no TLS close handshake with idle clients
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        self._remove_tmpdir()

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def reset_session(self) -> None:
        """Forget the priming calls and market data lines, as after IB's nightly reset."""
        self._portfolio_primed = False
        self._iserver_primed = False
        self._lines.clear()
        self.session = secrets.token_hex(16)
        self.started = time.time()

    # -- connections -------------------------------------------------------------------------
    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections[task] = writer
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    req = await asyncio.wait_for(read_request(reader, writer), IDLE_TIMEOUT_S)
                except HttpError as exc:
                    log.info("client portal: bad request from %s: %s", peer, exc)
                    writer.write(
                        render(
                            exc.status,
                            error_body(exc.status, exc.message),
                            keep_alive=not exc.close,
                        )
                    )
                    await writer.drain()
                    if exc.close:
                        break
                    continue
                if req is None:
                    break
                status, payload = await self.handle(req)
                keep = req.keep_alive
                try:
                    data = render(status, payload, keep, head=req.method == "HEAD")
                except ValueError:  # a NaN or infinity slipped into the answer
                    log.exception("client portal: cannot encode the answer to %s", req.path)
                    data = render(500, error_body(500, "internal error"), keep)
                writer.write(data)
                await writer.drain()
                if not keep:
                    break
        except (TimeoutError, ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # stop(); Python 3.11's streams would log a re-raise
            pass
        except Exception:  # a bug here must not take the server down
            log.exception("client portal: connection from %s failed", peer)
        finally:
            if task is not None:
                self._connections.pop(task, None)
            with contextlib.suppress(Exception):
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def handle(self, req: Request) -> tuple[int, Any]:
        """Route one parsed request; returns the status and the JSON payload."""
        log.debug("client portal: %s %s", req.method, req.target)
        if not req.path.startswith(API_PREFIX + "/"):
            return 404, error_body(404, f"no such endpoint: {req.path}")
        path = req.path[len(API_PREFIX) :].rstrip("/")
        for pattern, methods, name in _ROUTES:
            m = pattern.fullmatch(path)
            if m is None:
                continue
            method = "GET" if req.method == "HEAD" else req.method
            if method not in methods:
                return 405, error_body(405, f"method {req.method} not allowed on {req.path}")
            try:
                return await getattr(self, f"_{name}")(req, **m.groupdict())
            except HttpError as exc:
                return exc.status, error_body(exc.status, exc.message)
            except Exception:
                log.exception("client portal: %s %s failed", req.method, req.path)
                return 500, error_body(500, "internal error")
        return 404, error_body(404, f"no such endpoint: {req.path}")

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._compute is not None:
            return await self._compute(fn, *args)
        return fn(*args)

    # -- session -----------------------------------------------------------------------------
    async def _tickle(self, req: Request) -> tuple[int, Any]:
        self.last_tickle = time.time()
        self.tickles += 1
        remaining = max(SESSION_LENGTH_S - (self.last_tickle - self.started), 0.0)
        return 200, {
            "session": self.session,
            "ssoExpires": int(remaining * 1000),
            "collission": False,
            "userId": 1,
            "iserver": {"authStatus": self._auth_status_body()},
        }

    async def _auth_status(self, req: Request) -> tuple[int, Any]:
        return 200, self._auth_status_body()

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

    async def _portfolio_accounts(self, req: Request) -> tuple[int, Any]:
        self._portfolio_primed = True
        return 200, [self._account_object()]

    async def _positions(self, req: Request, acct: str, page: str | None) -> tuple[int, Any]:
        if not self._portfolio_primed:
            raise HttpError(500, ACCOUNTS_FIRST)
        if acct != self.book.universe.account:
            raise HttpError(404, f"Account {acct} not found")
        page = page or "0"
        if not page.isdigit() or not page.isascii():
            raise HttpError(400, f"page must be a non-negative integer, not {page[:20]!r}")
        index = int(page)
        positions = self.book.universe.positions[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]
        if not positions:
            return 200, []
        now = self.book.clock.now()
        rows = await self._run(self.book.portfolio, now)
        by_con = {r.inst.con_id: r for r in rows}
        wanted = {p.con_id for p in positions}
        return 200, [
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

    async def _iserver_accounts(self, req: Request) -> tuple[int, Any]:
        self._iserver_primed = True
        acct = self.book.universe.account
        return 200, {
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
    async def _snapshot(self, req: Request) -> tuple[int, Any]:
        if not self._iserver_primed:
            raise HttpError(500, ACCOUNTS_FIRST)
        conids: list[int] = []
        for text in (req.param("conids") or "").split(","):
            text = text.strip()
            if not text:
                continue
            if not text.isdigit() or not text.isascii():
                raise HttpError(400, f"conids must be integers, not {text[:20]!r}")
            if int(text) not in conids:
                conids.append(int(text))
        if not conids:
            raise HttpError(400, "Missing required parameter conids")
        if len(conids) > MAX_SNAPSHOT_CONIDS:
            raise HttpError(400, f"at most {MAX_SNAPSHOT_CONIDS} conids per snapshot")
        fields = [f.strip() for f in (req.param("fields") or "").split(",") if f.strip()]
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
        return 200, out

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

    async def _unsubscribe_all(self, req: Request) -> tuple[int, Any]:
        self._lines.clear()
        return 200, {"unsubscribed": True}

    async def _unsubscribe(self, req: Request) -> tuple[int, Any]:
        body = req.json()
        conid = body.get("conid") if isinstance(body, dict) else None
        try:
            conid = int(conid)
        except (TypeError, ValueError):
            raise HttpError(400, 'body must be {"conid": <integer>}') from None
        if self._lines.pop(conid, None) is None:
            raise HttpError(404, f"no market data line for conid {conid}")
        return 200, {"success": True}


async def start_portal(
    book: AccountBook, host: str, port: int, tls: bool = True, compute: Compute | None = None
) -> PortalServer:
    """Start the Client Portal Web API simulator on ``host:port`` (0 = any free port).

    ``compute(fn, *args)``, if given, runs market-model work (e.g. the gateway's single
    market worker, ``GatewayServer.compute``); otherwise it runs on the event loop.
    """
    return await PortalServer(book, host, tls=tls, compute=compute).start(port)
