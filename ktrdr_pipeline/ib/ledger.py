"""A pacing ledger: the shared record the governor consults before every historical request.

IB's pacing rules and its open-request cap apply per account, so every process that talks to
the gateway must see the same history. The ledger is that shared state, behind one atomic
operation, :meth:`PacingLedger.try_reserve`: *inside a single short transaction* it purges
stale data, evaluates the rules against the recorded events and open leases, and either
records the request (an event plus an open-request lease) or answers how long to wait.
Nobody holds a lock while waiting: the caller sleeps outside the transaction and asks again.

Implementations:

* :class:`MemoryPacingLedger`: one process (tests, single-process runs).
* :class:`SqlitePacingLedger`: all processes on one machine, via a SQLite file in WAL mode.

Porting to a shared server database (e.g. Postgres) needs only the same three tables and
the same statements (plain ``SELECT``/``INSERT``/``UPDATE``/``DELETE``, no SQLite-specific
SQL apart from the pragmas). Replace ``BEGIN IMMEDIATE`` by ``BEGIN`` followed by
``SELECT pg_advisory_xact_lock(<constant>)`` (or ``LOCK TABLE pacing_events IN EXCLUSIVE
MODE``) so that reservations serialise exactly as they do here. Pids only identify live
owners on the host that wrote them, hence the ``host`` column: leases from other hosts are
freed by expiry alone, which the governor keeps short by renewing the leases it holds.
Across hosts, read the time from the database server (``clock`` returning
``SELECT extract(epoch FROM clock_timestamp())``) rather than each host's clock.

Time is wall-clock seconds (``time.time()``), the only clock that processes share. It is read
*inside* the transaction, so the order of recorded events is the order of the decisions: a
time read before waiting for the lock could be older than an event another process records
meanwhile, and that event would then have been admitted without seeing this one. Any event
stamped later than the current reading (the wall clock stepped back) is moved to the current
time: it did happen before now, so counting it as "just now" is the conservative choice and
bounds the stall after a clock step to one window.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..domain.ib_rules import MAX_OPEN_HISTORICAL_REQUESTS, PacingLimits
from ..domain.pacing import PacedRequest, PacingEvent, PacingWindow
from ..locking import is_sqlite_locked, pid_alive, retry_while_locked

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# Why a reservation was refused. The governor queues waiters refused for the same reason
# behind one another, so that they do not all wake up and retry at the same instant.
OK = "ok"
PENALTY = "penalty"  # a back-off after IB reported a pacing violation anyway
IDENTICAL = "identical"  # identical request within 15 s
CONTRACT = "contract"  # 6 or more for one contract + tick type within 2 s
GLOBAL = "global"  # more than 60 within 600 s
OPEN = "open"  # too many open historical requests
OPEN_LARGE = "open_large"  # too many open requests for bars of 1 min and larger

DEFAULT_MAX_OPEN_LARGE = 6
DEFAULT_LEASE_TTL = 120.0

_GLOBAL_ONLY = "\x00ledger:global-only"


@dataclass(frozen=True)
class SlotPolicy:
    """The limits a reservation is checked against (passed by the caller on every call).

    Every process sharing one ledger must use the same ``limits``: events are purged once
    the caller's longest window has passed.
    """

    limits: PacingLimits = field(default_factory=PacingLimits)
    max_open: int = MAX_OPEN_HISTORICAL_REQUESTS
    max_open_large: int = DEFAULT_MAX_OPEN_LARGE
    lease_ttl: float = DEFAULT_LEASE_TTL


@dataclass(frozen=True)
class Reservation:
    """The answer of :meth:`PacingLedger.try_reserve`.

    Granted: ``token`` is set and ``wait`` is 0. Refused: ``token`` is None and ``wait`` is
    how many seconds to wait before asking again (exact for the pacing rules and a penalty;
    for the open-request caps only the time until the earliest lease expires, since a
    release by another process cannot be foreseen).
    """

    token: str | None
    wait: float
    reason: str
    at: float  # the ledger's time of the decision

    @property
    def granted(self) -> bool:
        return self.token is not None


@dataclass(frozen=True)
class Lease:
    """One open request: its owner (host, pid) and until when it counts without renewal."""

    token: str
    host: str
    pid: int
    large: bool
    started_at: float
    expires_at: float


class PacingLedger(ABC):
    """Shared pacing state: recorded paced requests, open-request leases, a penalty."""

    @abstractmethod
    def try_reserve(
        self,
        request: PacedRequest | None,
        policy: SlotPolicy,
        *,
        large: bool = False,
        now: float | None = None,
    ) -> Reservation:
        """Atomically reserve a slot for ``request`` or say how long to wait.

        ``request`` is None for requests outside the hard pacing rules (bars of 1 min and
        larger); they only take an open-request lease. ``large`` marks a request that also
        counts against ``policy.max_open_large``. On success the event is recorded at the
        ledger's current time and a lease owned by this process is opened; release it
        with :meth:`release`. ``now`` overrides the ledger's clock (tests).
        """

    @abstractmethod
    def release(self, token: str) -> None:
        """Mark an open request finished (unknown or purged tokens are ignored)."""

    @abstractmethod
    def renew(self, token: str, ttl: float, *, now: float | None = None) -> bool:
        """Push a lease's expiry to ``now + ttl``; False if the lease is gone (purged)."""

    @abstractmethod
    def open_count(self, *, large_only: bool = False, now: float | None = None) -> int:
        """How many requests are open (after purging leases of dead owners or past expiry)."""

    @abstractmethod
    def penalize(self, seconds: float, *, large: bool = False,
                 now: float | None = None) -> float:
        """Hold back requests for ``seconds``; returns the penalty's end time. ``large``:
        the penalty holds back requests for bars of 1 min and larger (IB's soft throttle
        answered one of them with a pacing violation); else the paced ones (small bars and
        head timestamps). An existing later penalty of the same scope is kept.
        """

    @abstractmethod
    def events(self) -> list[PacingEvent]:
        """The recorded paced requests still kept, oldest first (monitoring and tests)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free resources (connections)."""


# --- the rules, shared by every implementation --------------------------------------------


def _horizon(limits: PacingLimits) -> float:
    return max(limits.global_window, limits.identical_window, limits.same_contract_window)


def _binding_rule(window: PacingWindow, request: PacedRequest, now: float, t: float) -> str:
    """Which rule sets the earliest time ``t`` (the latest of the per-rule bounds)."""
    global_only = PacedRequest(_GLOBAL_ONLY, _GLOBAL_ONLY, request.weight)
    if window.next_allowed(global_only, now) >= t:
        return GLOBAL
    contract_and_global = PacedRequest(_GLOBAL_ONLY, request.tick_key, request.weight)
    if window.next_allowed(contract_and_global, now) >= t:
        return CONTRACT
    return IDENTICAL


def evaluate(
    request: PacedRequest | None,
    policy: SlotPolicy,
    *,
    large: bool,
    now: float,
    events: list[PacingEvent],
    leases: list[Lease],
    penalty_until: float,
) -> tuple[float, str]:
    """The pure decision behind :meth:`PacingLedger.try_reserve`: ``(wait, reason)``.

    ``events`` and ``leases`` must already be purged; ``wait`` is 0 exactly when granted.
    ``penalty_until`` is the penalty of the request's scope (:func:`penalty_key`).
    """
    if now < penalty_until:
        return penalty_until - now, PENALTY
    if request is not None:
        window = PacingWindow(policy.limits, events)
        t = window.next_allowed(request, now)
        if t > now:
            return t - now, _binding_rule(window, request, now, t)
    if len(leases) >= policy.max_open:
        return _lease_wait(leases, now), OPEN
    if large and sum(1 for lease in leases if lease.large) >= policy.max_open_large:
        return _lease_wait([lease for lease in leases if lease.large], now), OPEN_LARGE
    return 0.0, OK


def penalty_key(paced: bool) -> str:
    """Which penalty holds a request back: paced requests (small bars, head timestamps:
    those with a pacing key) share one, requests for larger bars another, so that a
    violation of one kind does not stall the other."""
    return "penalty_until" if paced else "penalty_until_large"


def _lease_wait(leases: list[Lease], now: float) -> float:
    return max(0.0, min((lease.expires_at for lease in leases), default=now) - now)


def _lease_is_stale(lease: Lease, now: float, host: str, alive: dict[int, bool]) -> bool:
    if lease.expires_at <= now:
        return True
    if lease.host != host:
        return False  # another machine's pid means nothing here: expiry only
    if lease.pid not in alive:
        alive[lease.pid] = pid_alive(lease.pid)
    return not alive[lease.pid]


def _new_token() -> str:
    return uuid.uuid4().hex


# --- in memory ----------------------------------------------------------------------------


class MemoryPacingLedger(PacingLedger):
    """A ledger for one process (thread-safe). Leases are freed by release or expiry."""

    def __init__(self, *, clock: Clock = time.time, retention: float = 0.0) -> None:
        """``retention``: keep events at least this many seconds (monitoring, tests)."""
        self._clock = clock
        self._retention = retention
        self._lock = threading.Lock()
        self._events: list[PacingEvent] = []
        self._leases: dict[str, Lease] = {}
        self._penalty_until: dict[str, float] = {}
        self._host = socket.gethostname()

    def _purge(self, now: float, horizon: float) -> None:
        keep = max(horizon, self._retention)
        self._events = [
            e if e.at <= now else PacingEvent(now, e.identity, e.tick_key, e.weight)
            for e in self._events
            if now < e.at + keep
        ]
        alive: dict[int, bool] = {}
        for token, lease in list(self._leases.items()):
            if _lease_is_stale(lease, now, self._host, alive):
                log.warning("purging stale lease %s (pid %d)", token, lease.pid)
                del self._leases[token]

    def try_reserve(
        self,
        request: PacedRequest | None,
        policy: SlotPolicy,
        *,
        large: bool = False,
        now: float | None = None,
    ) -> Reservation:
        with self._lock:
            now = self._clock() if now is None else now
            horizon = _horizon(policy.limits)
            self._purge(now, horizon)
            in_window = [e for e in self._events if now < e.at + horizon]
            wait, reason = evaluate(
                request,
                policy,
                large=large,
                now=now,
                events=in_window,
                leases=list(self._leases.values()),
                penalty_until=self._penalty_until.get(penalty_key(request is not None),
                                                    -math.inf),
            )
            if reason != OK:
                return Reservation(None, wait, reason, now)
            if request is not None:
                self._events.append(
                    PacingEvent(now, request.identity, request.tick_key, request.weight)
                )
            token = _new_token()
            self._leases[token] = Lease(
                token, self._host, os.getpid(), large, now, now + policy.lease_ttl
            )
            return Reservation(token, 0.0, OK, now)

    def release(self, token: str) -> None:
        with self._lock:
            self._leases.pop(token, None)

    def renew(self, token: str, ttl: float, *, now: float | None = None) -> bool:
        with self._lock:
            now = self._clock() if now is None else now
            lease = self._leases.get(token)
            if lease is None:
                return False
            self._leases[token] = Lease(
                token, lease.host, lease.pid, lease.large, lease.started_at, now + ttl
            )
            return True

    def open_count(self, *, large_only: bool = False, now: float | None = None) -> int:
        with self._lock:
            now = self._clock() if now is None else now
            alive: dict[int, bool] = {}
            for token, lease in list(self._leases.items()):
                if _lease_is_stale(lease, now, self._host, alive):
                    del self._leases[token]
            return sum(1 for lease in self._leases.values() if lease.large or not large_only)

    def penalize(self, seconds: float, *, large: bool = False,
                 now: float | None = None) -> float:
        with self._lock:
            now = self._clock() if now is None else now
            key = penalty_key(not large)
            until = max(self._penalty_until.get(key, -math.inf), now + seconds)
            self._penalty_until[key] = until
            return until

    def events(self) -> list[PacingEvent]:
        with self._lock:
            return sorted(self._events, key=lambda e: e.at)


# --- SQLite -------------------------------------------------------------------------------

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS pacing_events (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        identity TEXT NOT NULL,
        tick_key TEXT NOT NULL,
        weight INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS pacing_events_at ON pacing_events (at)",
    """CREATE TABLE IF NOT EXISTS open_leases (
        token TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        large INTEGER NOT NULL,
        started_at REAL NOT NULL,
        expires_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS ledger_state (
        key TEXT PRIMARY KEY,
        value REAL NOT NULL
    )""",
)


class SqlitePacingLedger(PacingLedger):
    """A ledger shared by every process on this machine through one SQLite file.

    WAL mode lets readers proceed during a write; every mutation runs in one short
    ``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two reservations
    can never both read the old state and both insert). Lock waits are bounded by
    ``busy_timeout`` and only ever last as long as another process's transaction, never
    as long as a pacing wait. The file must be on a local disk (WAL needs shared memory).

    Each process (and each fork) opens its own connection, lazily; one object may be shared
    by threads.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock = time.time,
        retention: float = 0.0,
        busy_timeout: float = 30.0,
    ) -> None:
        """``retention``: keep events at least this many seconds (monitoring, tests)."""
        self.path = Path(path)
        self._clock = clock
        self._retention = retention
        self._busy_timeout = busy_timeout
        self._host = socket.gethostname()
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._conn_pid: int | None = None
        with self._tx():
            pass  # create the schema now, so that configuration errors surface early

    # -- plumbing --

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._conn_pid == os.getpid():
            return self._conn
        # A connection inherited through fork() must not be used: open a new one.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        # switching modes needs a moment alone: retry while another connection holds it
        mode = retry_while_locked(
            lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone()[0],
            deadline_s=self._busy_timeout, is_locked=is_sqlite_locked,
            first_delay_s=0.01, max_delay_s=0.01)
        if str(mode).lower() != "wal":
            raise RuntimeError(f"cannot put pacing ledger {self.path} in WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._conn, self._conn_pid = conn, os.getpid()
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._conn_pid == os.getpid():
                self._conn.close()
            self._conn = None

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _purge_leases(self, conn: sqlite3.Connection, now: float) -> list[Lease]:
        rows = conn.execute(
            "SELECT token, host, pid, large, started_at, expires_at FROM open_leases"
        ).fetchall()
        leases = [Lease(t, h, p, bool(lg), s, x) for t, h, p, lg, s, x in rows]
        alive: dict[int, bool] = {}
        stale = [lease for lease in leases if _lease_is_stale(lease, now, self._host, alive)]
        for lease in stale:
            log.warning(
                "purging stale lease %s of %s pid %d (expired or owner gone)",
                lease.token,
                lease.host,
                lease.pid,
            )
            conn.execute("DELETE FROM open_leases WHERE token = ?", (lease.token,))
        return [lease for lease in leases if lease not in stale]

    # -- the interface --

    def try_reserve(
        self,
        request: PacedRequest | None,
        policy: SlotPolicy,
        *,
        large: bool = False,
        now: float | None = None,
    ) -> Reservation:
        horizon = _horizon(policy.limits)
        with self._tx() as conn:
            now = self._now(now)  # read under the write lock: see the module docstring
            conn.execute(
                "DELETE FROM pacing_events WHERE at + ? <= ?", (max(horizon, self._retention), now)
            )
            conn.execute("UPDATE pacing_events SET at = ? WHERE at > ?", (now, now))
            rows = conn.execute(
                "SELECT at, identity, tick_key, weight FROM pacing_events"
                " WHERE at + ? > ? ORDER BY at, id",
                (horizon, now),
            ).fetchall()
            events = [PacingEvent(*row) for row in rows]
            leases = self._purge_leases(conn, now)
            row = conn.execute("SELECT value FROM ledger_state WHERE key = ?",
                               (penalty_key(request is not None),))
            found = row.fetchone()
            wait, reason = evaluate(
                request,
                policy,
                large=large,
                now=now,
                events=events,
                leases=leases,
                penalty_until=found[0] if found else -math.inf,
            )
            if reason != OK:
                return Reservation(None, wait, reason, now)
            if request is not None:
                conn.execute(
                    "INSERT INTO pacing_events (at, identity, tick_key, weight)"
                    " VALUES (?, ?, ?, ?)",
                    (now, request.identity, request.tick_key, request.weight),
                )
            token = _new_token()
            conn.execute(
                "INSERT INTO open_leases (token, host, pid, large, started_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (token, self._host, os.getpid(), int(large), now, now + policy.lease_ttl),
            )
            return Reservation(token, 0.0, OK, now)

    def release(self, token: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM open_leases WHERE token = ?", (token,))

    def renew(self, token: str, ttl: float, *, now: float | None = None) -> bool:
        with self._tx() as conn:
            now = self._now(now)
            cur = conn.execute(
                "UPDATE open_leases SET expires_at = ? WHERE token = ?", (now + ttl, token)
            )
            return cur.rowcount > 0

    def open_count(self, *, large_only: bool = False, now: float | None = None) -> int:
        with self._tx() as conn:
            leases = self._purge_leases(conn, self._now(now))
            return sum(1 for lease in leases if lease.large or not large_only)

    def penalize(self, seconds: float, *, large: bool = False,
                 now: float | None = None) -> float:
        key = penalty_key(not large)
        with self._tx() as conn:
            until = self._now(now) + seconds
            found = conn.execute(
                "SELECT value FROM ledger_state WHERE key = ?", (key,)
            ).fetchone()
            if found is None:
                conn.execute("INSERT INTO ledger_state (key, value) VALUES (?, ?)", (key, until))
            elif found[0] < until:
                conn.execute("UPDATE ledger_state SET value = ? WHERE key = ?", (until, key))
            else:
                until = found[0]
            return until

    def events(self) -> list[PacingEvent]:
        with self._lock:
            rows = (
                self._connection()
                .execute("SELECT at, identity, tick_key, weight FROM pacing_events ORDER BY at, id")
                .fetchall()
            )
        return [PacingEvent(*row) for row in rows]
