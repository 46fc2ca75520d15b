"""The partition manifest: one row per stored partition, kept with every write.

Listing the store and reading its Parquet files to learn what is stored costs time per
file: ``coverage`` read every file, the tail-fill sensor read each symbol's newest partition
whole to find its newest bar. The manifest answers those questions from one small
database instead. Per (timeframe, symbol, period) it holds the partition's ``rows``, its
``first_bar`` and ``last_bar``, the ``last_completed`` bar (the newest that had closed when
it was fetched: the bar still in progress then does not count), ``use_rth`` and
``what_to_show``, the file's path (relative to the data directory), ``size`` and ``mtime_ns``,
and the whole :class:`~ktrdr_pipeline.domain.bars.PartitionMeta` the file carries (the
fetch state the sensor needs: ``partial_from``, ``asked_until``, ``empty_runs``).

**The Parquet file is the truth.** The manifest is derived from the files and can always be
rebuilt from their footers (``ktrdr-pipeline manifest rebuild``; ``manifest check`` lists
where the two disagree). :meth:`~.parquet.BarStore.write` keeps it current under the
partition's lock, journaled so that a writer killed between its file's rename and its
manifest row cannot leave a wrong row behind unnoticed:

1. ``begin_write`` records an *intent* (partition, writer's host and pid) and commits it;
2. the file is written, ``fsync``-ed and renamed (see :mod:`.parquet`);
3. ``put`` (or ``delete``) replaces the row and removes the intent in one transaction.

A kill after 1 leaves the intent. Readers (:meth:`~.parquet.BarStore.entries`) look at the
intents first (one query on a table that is empty but for writes in flight): an intent of a
dead writer (its pid is gone on this host, or it is older than an hour) is repaired by
re-reading that one partition's footer under its lock; an intent of a live writer means the
file may be newer than its row, so that partition's entry is read from the file for this
answer. A manifest that is missing, or was created while Parquet files already existed (a
store written before the manifest, a deleted manifest), is *incomplete*: the first reader
rebuilds it (logging a warning). Files changed behind the store's back (copied in, restored
from a backup) are what ``manifest check`` finds and ``manifest rebuild`` fixes.

:class:`PartitionManifest` is the small interface the store needs; :class:`SqliteManifest`
implements it with one SQLite file in WAL mode (``data_dir/manifest.sqlite``): writers in
several processes commit concurrently (SQLite serialises the short transactions, retried
while locked), readers never block them. A store spanning machines plugs in a shared
database behind the same methods.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..locking import is_sqlite_locked, pid_alive, retry_while_locked

if TYPE_CHECKING:
    from ..domain.bars import PartitionMeta

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.sqlite"
#: Read connections a thread keeps open (:meth:`SqliteManifest._reader`), one per file.
_READERS_PER_THREAD = 4
_readers = threading.local()
#: Version of the manifest's tables; another version is rebuilt from the files.
SCHEMA_VERSION = 1
LOCK_TIMEOUT_S = 30.0
#: An intent older than this is abandoned even if its pid is alive (a reused pid).
STALE_INTENT_AGE_S = 3600.0

Key = tuple[str, str, str]  # (timeframe, symbol, period)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ManifestEntry:
    """What the manifest knows of one stored partition. Times are epoch microseconds
    (UTC), None for a partition without bars."""

    timeframe: str
    symbol: str
    period: str
    rows: int
    first_bar: int | None
    last_bar: int | None
    last_completed: int | None
    use_rth: bool
    what_to_show: str
    path: str  # relative to the data directory, '/'-separated
    size: int
    mtime_ns: int
    meta_json: str  # PartitionMeta.to_json(), as written in the file

    @property
    def key(self) -> Key:
        return (self.timeframe, self.symbol, self.period)

    @functools.cached_property
    def meta(self) -> PartitionMeta:
        """The partition's metadata (parsed on first use)."""
        from ..domain.bars import PartitionMeta  # pandas: not at the start of `coverage`

        return PartitionMeta.from_json(json.loads(self.meta_json))

    @staticmethod
    def as_datetime(us: int | None) -> datetime | None:
        return None if us is None else _EPOCH + timedelta(microseconds=us)


@dataclass(frozen=True)
class Intent:
    """A write in flight (or abandoned): recorded before the rename, removed with the row."""

    timeframe: str
    symbol: str
    period: str
    token: str
    host: str
    pid: int
    started_at: float  # epoch seconds

    @property
    def key(self) -> Key:
        return (self.timeframe, self.symbol, self.period)

    def abandoned(self, now: float | None = None) -> bool:
        """Whether its writer is gone: a pid no longer alive on this host, or too old."""
        age = (now if now is not None else time.time()) - self.started_at
        if age > STALE_INTENT_AGE_S:
            return True
        if self.host != socket.gethostname():
            return False  # another machine's writer: only its age tells
        return not pid_alive(self.pid)


@dataclass(frozen=True)
class CoverageRow:
    """Per symbol and timeframe: the partitions holding at least one bar."""

    symbol: str
    timeframe: str
    first_bar: int  # epoch µs
    last_bar: int
    rows: int
    partitions: int


@runtime_checkable
class PartitionManifest(Protocol):
    """Where the store records what each partition holds (see the module docstring).

    ``exists``/``complete`` tell a reader whether the manifest can be trusted to list every
    partition; ``rebuild`` makes it so. Writers call ``begin_write`` before renaming a file
    and ``put``/``delete`` (with the token it returned) after."""

    def exists(self) -> bool: ...

    def complete(self) -> bool: ...

    def get(self, timeframe: str, symbol: str, period: str) -> ManifestEntry | None: ...

    def scan(self, timeframe: str | None = None, symbol: str | None = None,
             periods: Sequence[str] | None = None) -> list[ManifestEntry]: ...

    def coverage(self) -> list[CoverageRow]: ...

    def begin_write(self, timeframe: str, symbol: str, period: str,
                    has_files: Callable[[], bool]) -> str: ...

    def put(self, entry: ManifestEntry, *, token: str | None = None) -> None: ...

    def delete(self, timeframe: str, symbol: str, period: str, *,
               token: str | None = None) -> None: ...

    def intents(self) -> list[Intent]: ...

    def rebuild(self, entries: Iterable[ManifestEntry],
                recheck: Callable[[Key, ManifestEntry | None], ManifestEntry | None],
                keep_intents: Callable[[Intent], bool]) -> int: ...


_COLUMNS = ("timeframe", "symbol", "period", "rows", "first_bar", "last_bar", "last_completed",
            "use_rth", "what_to_show", "path", "size", "mtime_ns", "meta")
_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS partitions (timeframe TEXT NOT NULL, symbol TEXT NOT NULL, "
    "period TEXT NOT NULL, rows INTEGER NOT NULL, first_bar INTEGER, last_bar INTEGER, "
    "last_completed INTEGER, use_rth INTEGER NOT NULL, what_to_show TEXT NOT NULL, "
    "path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, meta TEXT NOT NULL, "
    "PRIMARY KEY (timeframe, symbol, period)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS partitions_by_symbol ON partitions (symbol, timeframe)",
    "CREATE TABLE IF NOT EXISTS intents (timeframe TEXT NOT NULL, symbol TEXT NOT NULL, "
    "period TEXT NOT NULL, token TEXT NOT NULL PRIMARY KEY, host TEXT NOT NULL, "
    "pid INTEGER NOT NULL, started_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
]


def _entry(row: Sequence) -> ManifestEntry:
    return ManifestEntry(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]),
                         row[8], row[9], row[10], row[11], row[12])


def _values(e: ManifestEntry) -> tuple:
    return (e.timeframe, e.symbol, e.period, e.rows, e.first_bar, e.last_bar, e.last_completed,
            int(e.use_rth), e.what_to_show, e.path, e.size, e.mtime_ns, e.meta_json)


_UPSERT = (f"INSERT OR REPLACE INTO partitions ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(_COLUMNS))})")


class SqliteManifest:
    """:class:`PartitionManifest` in one SQLite file (WAL mode, ``synchronous = FULL``: a
    committed row survives a power cut as the renamed file does). Each call opens its own
    connection, so one object serves every thread; transactions are short and retried
    while another process holds the write lock (up to ``timeout_s``)."""

    def __init__(self, path: Path | str, *, timeout_s: float = LOCK_TIMEOUT_S):
        self.path = Path(path)
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"SqliteManifest({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # -- connections ----------------------------------------------------------------------
    def _open(self, *, create: bool = False) -> sqlite3.Connection:
        """A new connection (autocommit; the file must exist unless ``create``), retried
        while SQLite reports the file locked."""
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"file:{self.path}" + ("" if create else "?mode=rw")
        return retry_while_locked(
            lambda: sqlite3.connect(uri, uri=True, timeout=self.timeout_s,
                                    isolation_level=None),
            deadline_s=self.timeout_s, is_locked=is_sqlite_locked)

    @contextmanager
    def _connect(self, *, create: bool = False) -> Iterator[sqlite3.Connection]:
        con = self._open(create=create)
        with closing(con):
            con.execute("PRAGMA synchronous = FULL")
            yield con

    def _retry(self, fn: Callable[[], object]) -> object:
        return retry_while_locked(
            fn, deadline_s=self.timeout_s, is_locked=is_sqlite_locked, max_delay_s=0.2,
            on_retry=lambda exc, d: log.debug("manifest %s locked (%s); retrying in %.2f s",
                                              self.path, exc, d))

    @contextmanager
    def _transaction(self, con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        self._retry(lambda: con.execute("BEGIN IMMEDIATE"))
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        self._retry(lambda: con.execute("COMMIT"))

    def _ensure_schema(self, con: sqlite3.Connection, has_files: Callable[[], bool]) -> None:
        """Create the tables when missing. A manifest created while the store already has
        files is incomplete until rebuilt; one created on an empty store is complete (every
        file written from now on passes through :meth:`begin_write` first)."""
        if con.execute("SELECT 1 FROM sqlite_master WHERE name = 'state'").fetchone():
            return
        self._retry(lambda: con.execute("PRAGMA journal_mode = WAL"))
        with self._transaction(con):
            for statement in _SCHEMA:
                con.execute(statement)
            if con.execute("SELECT 1 FROM state WHERE key = 'complete'").fetchone() is None:
                con.execute("INSERT INTO state VALUES ('version', ?)", (str(SCHEMA_VERSION),))
                con.execute("INSERT INTO state VALUES ('complete', ?)",
                            ("0" if has_files() else "1",))

    # -- reading --------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.path.is_file()

    def complete(self) -> bool:
        """Whether the manifest exists, has this version's tables and lists every partition
        (it was created on an empty store or rebuilt since)."""
        if not self.exists():
            return False
        try:
            with self._connect() as con:
                rows = dict(con.execute("SELECT key, value FROM state").fetchall())
        except sqlite3.DatabaseError as exc:  # no tables yet, not a database
            log.debug("manifest %s unusable: %s", self.path, exc)
            return False
        return rows.get("complete") == "1" and rows.get("version") == str(SCHEMA_VERSION)

    def get(self, timeframe: str, symbol: str, period: str) -> ManifestEntry | None:
        found = self._select("WHERE timeframe = ? AND symbol = ? AND period = ?",
                             (timeframe, symbol, period))
        return found[0] if found else None

    def scan(self, timeframe: str | None = None, symbol: str | None = None,
             periods: Sequence[str] | None = None) -> list[ManifestEntry]:
        """The rows of ``timeframe``/``symbol``/``periods`` (all when None), sorted by
        timeframe, symbol and period."""
        where, args = [], []
        if timeframe is not None:
            where.append("timeframe = ?")
            args.append(timeframe)
        if symbol is not None:
            where.append("symbol = ?")
            args.append(symbol)
        if periods is not None:
            where.append(f"period IN ({', '.join('?' * len(periods))})")
            args.extend(periods)
        return self._select(("WHERE " + " AND ".join(where)) if where else "", args)

    def _select(self, where: str, args: Sequence) -> list[ManifestEntry]:
        if not self.exists():
            return []
        with self._connect() as con:
            rows = self._retry(lambda: con.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM partitions {where} "
                "ORDER BY timeframe, symbol, period", args).fetchall())
        return [_entry(r) for r in rows]  # type: ignore[union-attr]

    def coverage(self) -> list[CoverageRow]:
        """Per symbol and timeframe with at least one bar: first and last bar, rows and
        the number of partitions holding bars (aggregated by SQLite, no row parsed)."""
        if not self.exists():
            return []
        with self._connect() as con:
            rows = self._retry(lambda: con.execute(
                "SELECT symbol, timeframe, min(first_bar), max(last_bar), sum(rows), count(*) "
                "FROM partitions WHERE rows > 0 GROUP BY symbol, timeframe "
                "ORDER BY symbol, timeframe").fetchall())
        return [CoverageRow(*r) for r in rows]  # type: ignore[union-attr]

    def intents(self) -> list[Intent]:
        if not self.exists():
            return []
        with self._connect() as con:
            try:
                rows = con.execute("SELECT timeframe, symbol, period, token, host, pid, "
                                   "started_at FROM intents").fetchall()
            except sqlite3.OperationalError as exc:  # created but no tables yet
                if "no such table" in str(exc):
                    return []
                raise
        return [Intent(*r) for r in rows]

    # -- one-connection answers for readers that list files (:mod:`.files`) --------------
    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """This thread's read connection to the manifest, kept open between calls (opening
        one costs ~0.4 ms, ten times the query it serves: ``read_bars`` asks once per
        call). Reopened when the file was replaced since (a rebuild or a set-aside renames
        it; its device and inode tell) or in a forked child, and closed when a call fails
        on it; at most :data:`_READERS_PER_THREAD` files per thread stay open.
        ``FileNotFoundError`` when there is no manifest file."""
        st = os.stat(self.path)
        ident = (st.st_dev, st.st_ino, os.getpid())
        cache = _readers.__dict__
        if cache.get("pid") != ident[2]:  # a connection must not cross a fork
            cache.clear()
            cache["pid"] = ident[2]
        cons: dict[str, tuple[sqlite3.Connection, tuple[int, int, int]]] = \
            cache.setdefault("cons", {})
        key = str(self.path)
        held = cons.pop(key, None)
        if held is not None and held[1] != ident:
            held[0].close()
            held = None
        if held is None:
            held = (self._open(), ident)
        try:
            yield held[0]
        except BaseException:
            held[0].close()
            raise
        cons[key] = held  # most recently used last
        while len(cons) > _READERS_PER_THREAD:
            cons.pop(next(iter(cons)))[0].close()

    def _settled_select(self, sql: str, args: Sequence) -> list[tuple] | None:
        """``sql``'s rows when the manifest is settled (complete, this version, no write in
        flight), read in one read transaction (one snapshot) on this thread's kept
        connection (:meth:`_reader`); None otherwise (the caller then lists the files)."""
        if not self.exists():
            return None
        try:
            with self._reader() as con:
                def read() -> list[tuple] | None:
                    con.execute("BEGIN")
                    try:
                        state = dict(con.execute("SELECT key, value FROM state").fetchall())
                        if (state.get("complete") != "1"
                                or state.get("version") != str(SCHEMA_VERSION)
                                or con.execute("SELECT 1 FROM intents LIMIT 1").fetchone()):
                            return None
                        return con.execute(sql, args).fetchall()
                    finally:
                        if con.in_transaction:
                            con.execute("COMMIT")

                return self._retry(read)  # type: ignore[return-value]
        except FileNotFoundError:  # removed since exists() looked
            return None
        except sqlite3.DatabaseError as exc:  # not a database, no tables yet
            if is_sqlite_locked(exc):
                raise
            log.debug("manifest %s unusable: %s", self.path, exc)
            return None

    def settled_files(self, timeframe: str, symbols: Sequence[str] | None = None,
                      periods: Sequence[str] | None = None, *, limit: int | None = None,
                      rows: bool = False) -> list[tuple] | None:
        """``(symbol, period, path)`` of the partitions of ``timeframe`` (of ``symbols`` /
        ``periods`` when given), sorted by symbol and period, ``path`` relative to the data
        directory, with the partition's row count last when ``rows``; None when the
        manifest is not settled (see :meth:`_settled_select`)."""
        where, args = ["timeframe = ?"], [timeframe]
        for column, values in (("symbol", symbols), ("period", periods)):
            if values is not None:
                where.append(f"{column} IN ({', '.join('?' * len(values))})")
                args.extend(values)
        sql = (f"SELECT symbol, period, path{', rows' if rows else ''} FROM partitions "
               f"WHERE {' AND '.join(where)} "
               "ORDER BY symbol, period" + (f" LIMIT {int(limit)}" if limit else ""))
        return self._settled_select(sql, args)  # type: ignore[return-value]

    def settled_symbols(self, timeframe: str) -> list[str] | None:
        """The symbols with at least one partition of ``timeframe``, sorted; None when the
        manifest is not settled."""
        rows = self._settled_select("SELECT DISTINCT symbol FROM partitions WHERE "
                                    "timeframe = ? ORDER BY symbol", (timeframe,))
        return None if rows is None else [r[0] for r in rows]

    def _set_aside_if_unreadable(self) -> None:
        """Rename a manifest SQLite cannot read (not a database, corrupt) out of the way, so
        that a rebuild starts afresh; the files are the truth."""
        if not self.exists():
            return
        try:
            with self._connect() as con:
                con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            if is_sqlite_locked(exc):
                raise
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
            log.warning("manifest %s is unreadable (%s): set aside as %s, rebuilding",
                        self.path, exc, aside.name)
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    # -- writing --------------------------------------------------------------------------
    def begin_write(self, timeframe: str, symbol: str, period: str,
                    has_files: Callable[[], bool]) -> str:
        """Record that this process is about to replace (or delete) the partition's file;
        returns the token :meth:`put`/:meth:`delete` clear it with. ``has_files`` tells,
        when the manifest has to be created, whether the store holds files already."""
        token = f"{os.getpid()}.{os.urandom(6).hex()}"
        try:
            with self._connect(create=True) as con:
                self._ensure_schema(con, has_files)
                with self._transaction(con):
                    con.execute("INSERT INTO intents VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (timeframe, symbol, period, token, socket.gethostname(),
                                 os.getpid(), time.time()))
        except sqlite3.DatabaseError as exc:
            if is_sqlite_locked(exc):
                raise
            raise OSError(f"the partition manifest {self.path} cannot be written ({exc}); "
                          "nothing was written. `ktrdr-pipeline manifest rebuild` recreates "
                          "it from the Parquet files") from exc
        return token

    def put(self, entry: ManifestEntry, *, token: str | None = None) -> None:
        """Replace the partition's row (and clear the intent ``token``) in one transaction."""
        with self._connect(create=True) as con, self._transaction(con):
            con.execute(_UPSERT, _values(entry))
            if token is not None:
                con.execute("DELETE FROM intents WHERE token = ?", (token,))

    def delete(self, timeframe: str, symbol: str, period: str, *,
               token: str | None = None) -> None:
        """Remove the partition's row (and clear the intent ``token``) in one transaction."""
        with self._connect(create=True) as con, self._transaction(con):
            con.execute("DELETE FROM partitions WHERE timeframe = ? AND symbol = ? AND "
                        "period = ?", (timeframe, symbol, period))
            if token is not None:
                con.execute("DELETE FROM intents WHERE token = ?", (token,))

    def rebuild(self, entries: Iterable[ManifestEntry],
                recheck: Callable[[Key, ManifestEntry | None], ManifestEntry | None],
                keep_intents: Callable[[Intent], bool]) -> int:
        """Make the rows those of ``entries`` (read from the files beforehand) and mark the
        manifest complete; returns how many rows were rechecked.

        Writers keep writing meanwhile, so inside the transaction (which holds SQLite's
        write lock: a writer's ``put`` waits for it) ``recheck(key, entry)`` is asked for
        every partition in ``entries`` or in the table: it returns ``entry`` when its file
        is unchanged, a fresh entry when a writer replaced it since it was read, None when
        it is gone. A writer that renames after the recheck puts its own row after the
        commit. Intents for which ``keep_intents`` is false (dead writers') are dropped:
        their partitions were just read from the files."""
        fresh = {e.key: e for e in entries}
        self._set_aside_if_unreadable()
        with self._connect(create=True) as con:
            if self.path.stat().st_size == 0 or not con.execute(
                    "SELECT 1 FROM sqlite_master WHERE name = 'state'").fetchone():
                self._ensure_schema(con, lambda: True)
            version = con.execute("SELECT value FROM state WHERE key = 'version'").fetchone()
            with self._transaction(con):
                if version is None or version[0] != str(SCHEMA_VERSION):
                    for table in ("partitions", "intents", "state"):
                        con.execute(f"DROP TABLE IF EXISTS {table}")
                    for statement in _SCHEMA:
                        con.execute(statement)
                known = [tuple(r) for r in con.execute(
                    "SELECT timeframe, symbol, period FROM partitions").fetchall()]
                keys = list(dict.fromkeys([*fresh, *known]))
                rows = [recheck(k, fresh.get(k)) for k in keys]  # type: ignore[arg-type]
                con.execute("DELETE FROM partitions")
                con.executemany(_UPSERT, [_values(e) for e in rows if e is not None])
                for intent in [Intent(*r) for r in con.execute(
                        "SELECT timeframe, symbol, period, token, host, pid, started_at "
                        "FROM intents").fetchall()]:
                    if not keep_intents(intent):
                        con.execute("DELETE FROM intents WHERE token = ?", (intent.token,))
                con.execute("INSERT OR REPLACE INTO state VALUES ('version', ?)",
                            (str(SCHEMA_VERSION),))
                con.execute("INSERT OR REPLACE INTO state VALUES ('complete', '1')")
                con.execute("INSERT OR REPLACE INTO state VALUES ('rebuilt_at', ?)",
                            (datetime.now(UTC).isoformat(),))
        return len(keys)

