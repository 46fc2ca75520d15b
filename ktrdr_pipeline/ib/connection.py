"""The connection to IB Gateway / TWS: connect with retries, client-id rotation,
reconnect with backoff, the nightly-reset window, and a status report.

Async all the way (``ib_async``'s blocking calls cannot run inside a running loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ib_async import IB

from ..domain import ib_rules
from ..domain.reset_window import ResetWindow
from ..settings import Settings
from .errors import GatewayUnreachable

log = logging.getLogger(__name__)


@dataclass
class ConnectionStatus:
    host: str
    port: int
    connected: bool = False
    client_id: int | None = None
    server_version: int | None = None
    accounts: list[str] = field(default_factory=list)
    last_error: str | None = None
    last_fetch: datetime | None = None
    reconnects: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "host": self.host, "port": self.port, "connected": self.connected,
            "client_id": self.client_id, "server_version": self.server_version,
            "accounts": self.accounts, "last_error": self.last_error,
            "last_fetch": self.last_fetch.isoformat() if self.last_fetch else None,
            "reconnects": self.reconnects,
        }


class HandledConnectionNoise(logging.Filter):
    """Drops ib_async's ERROR records about what :class:`IBConnection` handles and reports
    in its own words: a client id in use (326: the next id of the span is tried, which is
    routine when runs overlap) and the cancelled connect that follows it. Without it a
    Dagster run's log reads like a crash when nothing failed."""

    _IN_USE = f"Error {ib_rules.ERR_CLIENT_ID_IN_USE},"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self._IN_USE)
                    or message.startswith("API connection failed: CancelledError"))


_NOISE_FILTER = HandledConnectionNoise()


def _quiet_handled_connection_errors() -> None:
    for name in ("ib_async.wrapper", "ib_async.client"):
        logger = logging.getLogger(name)
        if _NOISE_FILTER not in logger.filters:
            logger.addFilter(_NOISE_FILTER)


class IBConnection:
    """Owns one ``ib_async.IB`` client and keeps it connected."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 4002,
        client_id: int = 1,
        *,
        client_ids: range | None = None,
        attempts: int = 3,
        backoff_s: float = 1.0,
        connect_timeout: float = 10.0,
        reset_window: ResetWindow | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.host, self.port = host, port
        self.client_ids = client_ids or range(client_id, client_id + 10)
        if client_id not in self.client_ids:
            raise ValueError(f"client id {client_id} is outside the range {self.client_ids}")
        self._preferred = client_id
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.connect_timeout = connect_timeout
        self.reset_window = reset_window or ResetWindow()
        self.clock = clock
        self.sleep = sleep
        _quiet_handled_connection_errors()
        self.ib = IB()
        self.ib.RaiseRequestErrors = True
        self.status_info = ConnectionStatus(host, port)
        self.clock_offset = timedelta(0)
        self._lock = asyncio.Lock()
        self._ever_connected = False
        self._warned_end_without_zone = False
        self.ib.errorEvent += self._on_error
        self.ib.disconnectedEvent += self._on_disconnected

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs) -> IBConnection:
        kwargs.setdefault("client_ids", range(settings.ib_client_id,
                                              settings.ib_client_id + settings.client_id_span))
        kwargs.setdefault("reset_window", ResetWindow.parse(settings.reset_window))
        return cls(settings.ib_host, settings.ib_port, settings.ib_client_id, **kwargs)

    # -- events -------------------------------------------------------------------------
    def _on_error(self, req_id: int, code: int, message: str, contract) -> None:
        if code in ib_rules.INFO_CODES:
            return  # farm status notices
        if code == ib_rules.WARN_END_WITHOUT_ZONE:
            # informational, never fatal: IB still answers the request (§2); said once per
            # connection, not once per request
            if not self._warned_end_without_zone:
                self._warned_end_without_zone = True
                log.warning("IB warns (2174) that a request's end time had no time zone and "
                            "was read in the gateway's zone; send zoned end times (request "
                            "%s: %s)", req_id, message)
            return
        self.status_info.last_error = f"{code}: {message}"
        if code == ib_rules.ERR_CONNECTIVITY_LOST:
            log.warning("IB reports connectivity lost (1100); requests pause until restored")

    def _on_disconnected(self) -> None:
        self.status_info.connected = False
        if self._ever_connected:
            log.warning("disconnected from IB Gateway at %s:%d", self.host, self.port)

    # -- connecting ---------------------------------------------------------------------
    async def connect(self) -> IBConnection:
        """Connect, retrying with exponential backoff; a client id in use moves to the
        next id of the range. Raises :class:`GatewayUnreachable` naming host and port."""
        async with self._lock:
            if self.ib.isConnected():
                return self
            await self._connect_locked()
            return self

    async def _connect_locked(self) -> None:
        ids = list(self.client_ids)
        start = ids.index(self._preferred)  # always one of them (checked in __init__)
        ids = ids[start:] + ids[:start]
        last_exc: BaseException | None = None
        failures = 0
        k = 0
        while failures < self.attempts:
            client_id = ids[k % len(ids)]
            in_use = asyncio.Event()

            def on_error(req_id, code, message, contract, _ev=in_use):
                if code == ib_rules.ERR_CLIENT_ID_IN_USE:
                    _ev.set()

            self.ib.errorEvent += on_error
            try:
                await self._connect_or_in_use(client_id, in_use)
                self._on_connected(client_id)
                await self._measure_clock()
                return
            except (OSError, TimeoutError, ConnectionError) as exc:
                last_exc = exc
                self.ib.disconnect()
                if in_use.is_set() or "already in use" in str(exc):
                    log.info("client id %d is in use by another session; trying the next "
                             "one", client_id)
                    k += 1
                    if k >= len(ids):
                        raise GatewayUnreachable(
                            f"every client id in {self.client_ids.start}..."
                            f"{self.client_ids.stop - 1} is in use at {self.host}:{self.port}"
                        ) from exc
                    continue
                failures += 1
                self.status_info.last_error = f"connect failed: {exc!r}"
                if failures < self.attempts:
                    delay = self.backoff_s * 2 ** (failures - 1)
                    log.warning("cannot connect to %s:%d (%s); retrying in %.1fs", self.host,
                                self.port, exc.__class__.__name__, delay)
                    await self.sleep(delay)
            finally:
                self.ib.errorEvent -= on_error
        raise GatewayUnreachable(
            f"cannot reach IB Gateway/TWS at {self.host}:{self.port} after {self.attempts} "
            f"attempts ({last_exc!r}); is it running with the API enabled on that port?"
        ) from last_exc

    def server_now(self) -> datetime:
        """IB's idea of now: the local clock corrected by the offset measured at connect
        (so gap analysis never expects bars the gateway cannot have yet)."""
        return datetime.now(UTC) + self.clock_offset

    async def _measure_clock(self) -> None:
        try:
            before = datetime.now(UTC)
            server = await asyncio.wait_for(self.ib.reqCurrentTimeAsync(), 5)
            after = datetime.now(UTC)
        except (TimeoutError, ConnectionError) as exc:
            log.warning("cannot read IB's current time (%s); using the local clock", exc)
            return
        local = before + (after - before) / 2
        offset = server - local
        # IB reports whole seconds: ignore offsets within that resolution
        self.clock_offset = offset if abs(offset) > timedelta(seconds=2) else timedelta(0)
        if self.clock_offset:
            log.info("IB's clock is %s ahead of this machine's", self.clock_offset)

    async def _connect_or_in_use(self, client_id: int, in_use: asyncio.Event) -> None:
        """connectAsync, but give up at once when the gateway answers 326 (it would
        otherwise wait for its full timeout)."""
        connect = asyncio.ensure_future(self.ib.connectAsync(
            self.host, self.port, clientId=client_id, timeout=self.connect_timeout))
        refused = asyncio.ensure_future(in_use.wait())
        try:
            await asyncio.wait({connect, refused}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            refused.cancel()
        if not connect.done():
            connect.cancel()
            with contextlib.suppress(BaseException):
                await connect
            raise ConnectionError(f"client id {client_id} is already in use")
        connect.result()

    def _on_connected(self, client_id: int) -> None:
        self._preferred = client_id
        self._warned_end_without_zone = False
        st = self.status_info
        if self._ever_connected:
            st.reconnects += 1
        self._ever_connected = True
        st.connected = True
        st.client_id = client_id
        st.server_version = self.ib.client.serverVersion()
        st.accounts = list(self.ib.managedAccounts())
        log.info("connected to %s:%d as client %d (server version %s)", self.host, self.port,
                 client_id, st.server_version)

    async def ensure_connected(self) -> IB:
        """The connected client, reconnecting with backoff after a drop, and holding new
        requests until IB's nightly reset window is over."""
        await self.wait_outside_reset_window()
        if not self.ib.isConnected():
            await self.connect()
        return self.ib

    async def wait_outside_reset_window(self) -> None:
        now = self.clock()
        if self.reset_window.contains(now):
            until = self.reset_window.ends_after(now)
            log.info("inside IB's nightly reset window; pausing until %s", until.isoformat())
            await self.sleep(max((until - now).total_seconds(), 0.0))

    def record_fetch(self) -> None:
        self.status_info.last_fetch = self.clock()

    def status(self) -> dict[str, object]:
        self.status_info.connected = self.ib.isConnected()
        return self.status_info.as_dict()

    async def disconnect(self) -> None:
        self._ever_connected = False
        self.ib.disconnect()
        self.status_info.connected = False
