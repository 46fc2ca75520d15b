"""DuckDB tables ``portfolio_greeks`` and ``api_logs``, with an outage buffer.

The database file (``KTRDR_DATA_DIR/greeks.duckdb``) is opened for each write and closed
right after, so other processes (``ktrdr-pipeline sql``, which attaches it read-only as
``greeks``; a Dagster check; DBeaver) can read it between writes.

**Circuit breaker.** A write that fails (the file is locked by another process for more
than ``lock_wait`` seconds, the disk is full, the directory is gone...) does not lose the
rows: they are appended to a JSONL buffer (``BRIDGE_BUFFER_PATH``), one line per batch,
written with ``O_APPEND`` and ``fsync``. While the buffer holds anything, every new batch
is appended behind it (so the database receives rows in their original order) and a
flush is tried every
``flush_interval`` seconds (60 by default): the whole buffer is inserted in one
transaction, in file order, and the buffer is truncated only after that transaction has
committed. Then normal writes resume.

**Schema.** The tables are created once per :class:`GreeksStore`, by
:meth:`GreeksStore.bootstrap` at start-up (or, if the database was unavailable then, by the
first write that gets through); later writes only insert.

**Exactly once.** Rows have primary keys (``snapshot_id, con_id``; ``log_id``) and are
inserted with ``INSERT OR IGNORE``, so a flush repeated after a crash between the commit
and the truncation (or two processes taking the same tick) stores nothing twice. A batch
half-written to the buffer by a crash is an unparsable line: it is skipped with a
warning. Every buffer operation holds an exclusive file lock on ``<buffer>.lock``, so
several processes sharing a data directory (overlapping scheduled runs, a standing
``greeks run``) keep one order and never flush the same lines concurrently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from ..locking import exclusive_file_lock, is_duckdb_locked, retry_while_locked
from .model import Snapshot

log = logging.getLogger(__name__)

GREEKS_TABLE = "portfolio_greeks"
LOGS_TABLE = "api_logs"

GREEKS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("snapshot_id", "VARCHAR NOT NULL"),
    ("con_id", "BIGINT NOT NULL"),
    ("tick_time", "TIMESTAMPTZ NOT NULL"),
    ("snapshot_time", "TIMESTAMPTZ NOT NULL"),
    ("data_time", "TIMESTAMPTZ"),
    ("account", "VARCHAR NOT NULL"),
    ("mode", "VARCHAR NOT NULL"),
    ("symbol", "VARCHAR NOT NULL"),
    ("sec_type", "VARCHAR NOT NULL"),
    ("local_symbol", "VARCHAR"),
    ("expiry", "VARCHAR"),
    ("strike", "DOUBLE"),
    ("option_right", "VARCHAR"),
    ("position", "DOUBLE"),
    ("multiplier", "DOUBLE"),
    ("delta", "DOUBLE"),
    ("gamma", "DOUBLE"),
    ("vega", "DOUBLE"),
    ("theta", "DOUBLE"),
    ("unit_delta", "DOUBLE"),
    ("unit_gamma", "DOUBLE"),
    ("unit_vega", "DOUBLE"),
    ("unit_theta", "DOUBLE"),
    ("implied_vol", "DOUBLE"),
    ("underlying_price", "DOUBLE"),
    ("positions", "INTEGER"),
    ("missing_greeks", "INTEGER NOT NULL"),
)
LOGS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("log_id", "VARCHAR NOT NULL"),
    ("ts", "TIMESTAMPTZ NOT NULL"),
    ("mode", "VARCHAR"),
    ("event", "VARCHAR NOT NULL"),
    ("attempt", "INTEGER"),
    ("delay_s", "DOUBLE"),
    ("code", "INTEGER"),
    ("message", "VARCHAR"),
)
TABLES: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    GREEKS_TABLE: (GREEKS_COLUMNS, "snapshot_id, con_id"),
    LOGS_TABLE: (LOGS_COLUMNS, "log_id"),
}
_TIME_COLUMNS = {"tick_time", "snapshot_time", "data_time", "ts"}

#: Events written to ``api_logs``.
EVENTS = ("connect", "disconnect", "reconnect_attempt", "reset_wait", "error",
          "db_unavailable", "buffer_flushed")
#: ``api_logs.message`` keeps this many characters.
MESSAGE_MAX = 2000


def api_log_row(event: str, *, ts: datetime, mode: str | None, message: str | None = None,
                attempt: int | None = None, delay_s: float | None = None,
                code: int | None = None) -> dict[str, Any]:
    """One ``api_logs`` row, the only place one is built: a fresh ``log_id``, ``ts`` in
    UTC, ``message`` cut to :data:`MESSAGE_MAX` characters (empty: NULL)."""
    return {"log_id": uuid.uuid4().hex, "ts": ts.astimezone(UTC), "mode": mode,
            "event": event, "attempt": attempt, "delay_s": delay_s, "code": code,
            "message": message[:MESSAGE_MAX] if message else None}


def schema_statements() -> list[str]:
    out = []
    for table, (columns, key) in TABLES.items():
        cols = ",\n  ".join(f"{name} {kind}" for name, kind in columns)
        out.append(f"CREATE TABLE IF NOT EXISTS {table} (\n  {cols},\n"
                   f"  written_at TIMESTAMPTZ DEFAULT current_timestamp,\n"
                   f"  PRIMARY KEY ({key})\n)")
    return out


def _insert_sql(table: str) -> str:
    cols = [c for c, _ in TABLES[table][0]]
    return (f"INSERT OR IGNORE INTO {table} ({', '.join(cols)}) "
            f"VALUES ({', '.join('?' for _ in cols)})")


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return value


def _decode_row(table: str, row: dict[str, Any]) -> list[Any]:
    values = []
    for col, _ in TABLES[table][0]:
        v = row.get(col)
        if col in _TIME_COLUMNS and isinstance(v, str):
            v = datetime.fromisoformat(v)
        values.append(v)
    return values


@dataclass(frozen=True)
class Batch:
    """Rows for one table, written (or buffered) together."""

    table: str
    rows: tuple[dict[str, Any], ...]

    def to_json(self) -> str:
        return json.dumps({"table": self.table,
                           "rows": [{k: _encode(v) for k, v in r.items()} for r in self.rows]},
                          separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, line: str) -> Batch:
        obj = json.loads(line)
        if obj.get("table") not in TABLES or not isinstance(obj.get("rows"), list):
            raise ValueError("not a buffered batch")
        return cls(obj["table"], tuple(obj["rows"]))


class JsonlBuffer:
    """The outage buffer: batches as JSON lines, appended with ``fsync``.

    Callers hold :meth:`locked` around every operation (see :class:`GreeksStore`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._thread_lock = threading.RLock()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        # the thread lock first: a second open of the lock file in this process would wait
        # for the first one, so a thread re-entering must not take the file lock again
        with self._thread_lock, exclusive_file_lock(self.lock_path):
            yield

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, batch: Batch) -> None:
        data = (batch.to_json() + "\n").encode()
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end > 0 and os.pread(fd, 1, end - 1) != b"\n":
                data = b"\n" + data  # a crash left half a line: keep ours separate
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            self._fsync_dir()

    def read(self) -> list[Batch]:
        """Every complete batch, in file order; damaged lines are skipped."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for n, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                out.append(Batch.from_json(line.decode()))
            except (ValueError, UnicodeDecodeError):
                log.warning("outage buffer %s: line %d is damaged (an interrupted write?); "
                            "skipped", self.path, n)
        return out

    def clear(self) -> None:
        """Empty the buffer in one step (``ftruncate``), durably."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            os.ftruncate(fd, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fsync_dir(self) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class GreeksStore:
    """Writes snapshots and API log rows to DuckDB, through the outage buffer when the
    database is unavailable. Safe to share between threads of one process."""

    def __init__(self, db_path: Path, buffer_path: Path, *, flush_interval: float = 60.0,
                 mode: str = "", lock_wait: float = 0.5,
                 monotonic: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.db_path = Path(db_path)
        self.buffer = JsonlBuffer(buffer_path)
        self.flush_interval = flush_interval
        self.lock_wait = lock_wait
        self.mode = mode
        self.monotonic = monotonic
        self.now = now
        self._next_flush = float("-inf")  # a buffer left by an earlier process: flush now
        self._unavailable_since: float | None = None
        self._schema_ready = False  # the tables exist: writes only insert

    # -- schema ------------------------------------------------------------------------------
    def bootstrap(self) -> bool:
        """Create both tables if missing (a no-op when they exist), then flush any buffer
        left by an earlier process. False when the database is unavailable right now
        (the tables are then created by the first write that gets through)."""
        self._schema_ready = False  # check again: another process may have replaced the file
        try:
            self._write([])
        except (duckdb.Error, OSError) as exc:
            log.warning("Greeks database %s unavailable at start (%s); rows will be "
                        "buffered in %s", self.db_path, exc, self.buffer.path)
            return False
        self.flush_if_due()
        return True

    def _connect(self) -> duckdb.DuckDBPyConnection:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        return duckdb.connect(str(self.db_path), config={"autoinstall_known_extensions": False})

    def _write(self, batches: Sequence[Batch]) -> None:
        """All ``batches`` in one transaction, in order (the tables created first when this
        store has not created them yet); raises on any failure."""
        con = self._connect()
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                if not self._schema_ready:
                    for st in schema_statements():
                        con.execute(st)
                for b in batches:
                    if b.rows:
                        con.executemany(_insert_sql(b.table),
                                        [_decode_row(b.table, r) for r in b.rows])
                con.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                if isinstance(exc, duckdb.CatalogException):
                    self._schema_ready = False  # the file was replaced: create them again
                raise
        finally:
            con.close()
        self._schema_ready = True

    def _write_waiting(self, batches: Sequence[Batch]) -> None:
        """:meth:`_write`, retrying for up to ``lock_wait`` seconds while another process
        holds the file (a reader's query takes milliseconds: no reason to buffer)."""
        retry_while_locked(lambda: self._write(batches), deadline_s=self.lock_wait,
                           is_locked=is_duckdb_locked, max_delay_s=0.1)

    # -- writing -----------------------------------------------------------------------------
    def write_snapshot(self, snapshot: Snapshot) -> str:
        """Store one snapshot; ``"written"`` or ``"buffered"``."""
        return self.write(Batch(GREEKS_TABLE, tuple(snapshot.rows())))

    def log_event(self, event: str, *, message: str = "", attempt: int | None = None,
                  delay_s: float | None = None, code: int | None = None,
                  ts: datetime | None = None, mode: str | None = None) -> str:
        """One ``api_logs`` row (connect, disconnect, reconnect_attempt, error, ...)."""
        row = api_log_row(event, ts=ts or self.now(),
                          mode=mode if mode is not None else self.mode, message=message,
                          attempt=attempt, delay_s=delay_s, code=code)
        return self.write(Batch(LOGS_TABLE, (row,)))

    def write(self, batch: Batch) -> str:
        with self.buffer.locked():
            if self.buffer.size() > 0:
                self._flush_locked(only_if_due=True)
            if self.buffer.size() == 0:
                try:
                    self._write_waiting([batch])
                except (duckdb.Error, OSError) as exc:
                    self._went_unavailable(exc)
                else:
                    return "written"
            self.buffer.append(batch)
            return "buffered"

    def _went_unavailable(self, exc: BaseException) -> None:
        now = self.monotonic()
        self._next_flush = now + self.flush_interval
        if self._unavailable_since is None:
            self._unavailable_since = now
            log.warning("cannot write to %s (%s); buffering in %s and retrying every %g s",
                        self.db_path, exc, self.buffer.path, self.flush_interval)
            row = api_log_row("db_unavailable", ts=self.now(), mode=self.mode,
                              delay_s=self.flush_interval,
                              message=f"{type(exc).__name__}: {exc}")
            self.buffer.append(Batch(LOGS_TABLE, (row,)))

    # -- flushing ----------------------------------------------------------------------------
    def flush_if_due(self) -> int:
        """Flush the buffer if it holds anything and the retry interval has passed;
        returns the number of batches written."""
        if self.buffer.size() == 0:
            return 0
        with self.buffer.locked():
            return self._flush_locked(only_if_due=True)

    def flush(self) -> int:
        """Flush now, whatever the retry interval (e.g. at shutdown)."""
        with self.buffer.locked():
            return self._flush_locked(only_if_due=False)

    def _flush_locked(self, only_if_due: bool) -> int:
        if self.buffer.size() == 0:
            return 0
        if only_if_due and self.monotonic() < self._next_flush:
            return 0
        batches = self.buffer.read()
        try:
            self._write(batches)
        except (duckdb.Error, OSError) as exc:
            self._next_flush = self.monotonic() + self.flush_interval
            log.info("flush of %d buffered batch(es) failed (%s); next try in %g s",
                     len(batches), exc, self.flush_interval)
            return 0
        self.buffer.clear()  # only now: the rows are committed
        since = self._unavailable_since
        self._unavailable_since = None
        self._next_flush = float("-inf")
        took = f" after {self.monotonic() - since:.0f} s" if since is not None else ""
        log.info("wrote %d buffered batch(es) to %s%s", len(batches), self.db_path, took)
        with contextlib.suppress(duckdb.Error, OSError):
            row = api_log_row("buffer_flushed", ts=self.now(), mode=self.mode,
                              code=len(batches),
                              message=f"{len(batches)} buffered batch(es) written{took}")
            self._write([Batch(LOGS_TABLE, (row,))])
        return len(batches)

    def pending(self) -> int:
        """Batches waiting in the buffer."""
        with self.buffer.locked():
            return len(self.buffer.read())


# -- reading -----------------------------------------------------------------------------------
def connect_readonly(db_path: Path, timeout_s: float = 5.0) -> duckdb.DuckDBPyConnection:
    """A read-only connection, retrying while a writer holds the file (each write holds
    it for milliseconds). Raises the last ``duckdb.Error`` after ``timeout_s``, and any
    other error (a missing file) at once."""
    def connect() -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(str(db_path), read_only=True)
        con.execute("SET TimeZone = 'UTC'")
        return con

    return retry_while_locked(connect, deadline_s=timeout_s, is_locked=is_duckdb_locked,
                              max_delay_s=0.2)


def read_rows(db_path: Path, sql: str, params: Sequence[Any] = (),
              timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Rows of a read-only query on the Greeks database, as dicts."""
    con = connect_readonly(db_path, timeout_s)
    try:
        cur = con.execute(sql, list(params))
        cols = [d[0] for d in cur.description or []]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()
