"""Bars as Hive-partitioned Parquet files, one file per timeframe × symbol × period.

Layout::

    data_dir/bars/timeframe=<tf>/symbol=<SYM>/period=<key>/data.parquet

Columns ``ts`` (timestamp[us, tz=UTC]), ``open``, ``high``, ``low``, ``close``, ``volume``,
``wap`` (float64, NaN = not available) and ``bar_count`` (int64). The Parquet key-value
metadata holds, under the key ``ktrdr``, a JSON object with ``use_rth``, ``what_to_show``,
the partition's coordinates, ``rows``, ``written_at`` and any extra metadata of the writer
(contract id, fetch time, ...).

Writes are atomic: the file is written to a temporary file in the same directory, flushed
to disk (``fsync``) and renamed over ``data.parquet`` (``os.replace``), then the directory
is synced. A reader therefore sees either the previous complete file or the new complete
file, never a torn one; a process killed mid-write leaves only a
``data.parquet.<pid>.<random>.tmp`` file, which readers (and the DuckDB glob, which names
``data.parquet`` exactly) ignore. Such leftovers of dead writers are removed by the next
write of that partition, and by a store's first write of any partition of that symbol and
timeframe (one directory scan per symbol × timeframe a process writes, so a kill during a
rewrite of an old month is cleaned up by the next load of the current one); temporary files
of live writers are left alone. Readers never delete anything.

Writers of one partition take turns: :meth:`BarStore.write` holds the partition's lock
(:mod:`.locks`), and a read-merge-write (the loader's) holds it across the re-read, the
merge and the write with :meth:`BarStore.locked`, so a second writer merges onto what the
first wrote instead of replacing it.

Every write and delete also updates the partition's row in the store's manifest
(:mod:`.manifest`, ``data_dir/manifest.sqlite``) under the same lock, journaled around the
rename: :meth:`BarStore.entries` and :meth:`BarStore.coverage` answer what is stored without
opening the files, and repair (or rebuild) the manifest from the files when a writer died
between its rename and its row.

Every timeframe, symbol and period is validated *before* it becomes a path component, so
no caller-supplied string can point outside ``data_dir/bars``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..domain.bars import BAR_COLUMNS, FORMAT_VERSION, FetchState, PartitionMeta, empty_bars
from ..domain.symbols import check_storage_key
from ..domain.timeframes import TIMEFRAMES, Timeframe
from ..locking import pid_alive
from .bar_file import read_bar_file
from .locks import FilePartitionLock, PartitionLock
from .manifest import (
    MANIFEST_FILE,
    CoverageRow,
    Key,
    ManifestEntry,
    PartitionManifest,
    SqliteManifest,
)

log = logging.getLogger(__name__)

FILE_NAME = "data.parquet"
META_KEY = b"ktrdr"
#: Keys of the metadata the store sets itself; ``extra_meta`` may not override them.
RESERVED_META = frozenset(f.name for f in dataclasses.fields(PartitionMeta)) - {"fetch", "extra"}
FLOAT_COLUMNS = ["open", "high", "low", "close", "volume", "wap"]

#: Every column is required (not nullable): a missing volume or WAP is NaN, never null
#: (:func:`_frame_to_table`), so the files carry no definition levels, which readers would
#: otherwise decode for every value (about a seventh of decoding a month of 1-minute bars,
#: ``benchmarks/bench_read.py``). Files written before with nullable float columns read
#: the same (readers unify the two, e.g. ``concat_tables(promote_options="default")``).
SCHEMA = pa.schema([
    pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
    *(pa.field(c, pa.float64(), nullable=False) for c in FLOAT_COLUMNS),
    pa.field("bar_count", pa.int64(), nullable=False),
])

#: A temporary file of this store: ``data.parquet.<pid>.<random>.tmp``.
_TMP_RE = re.compile(r"^data\.parquet\.(\d+)\.[0-9a-f]+(?:\.deleted)?\.tmp$")
#: A temporary file of a live process older than this is considered abandoned anyway.
STALE_TMP_AGE_S = 3600.0
_PERIOD_HINT = {"daily": "YYYY-MM-DD", "monthly": "YYYY-MM", "yearly": "YYYY"}
_PERIOD_SHAPE = {
    "daily": re.compile(r"^\d{4}-\d{2}-\d{2}$"),
    "monthly": re.compile(r"^\d{4}-\d{2}$"),
    "yearly": re.compile(r"^\d{4}$"),
}


# -- validation of path components --------------------------------------------------------
def check_timeframe(tf: str | Timeframe) -> Timeframe:
    """The timeframe named exactly ``tf`` (no surrounding spaces, no aliases)."""
    if isinstance(tf, Timeframe):
        tf = tf.name
    if not isinstance(tf, str) or tf not in TIMEFRAMES:
        raise ValueError(f"unknown timeframe {tf!r}; allowed: {', '.join(TIMEFRAMES)}")
    return TIMEFRAMES[tf]


def check_period(tf: Timeframe, period: str) -> tuple[datetime, datetime]:
    """The [start, end) bounds (UTC) of ``period``, which must be the canonical key of a
    ``tf`` period (``2025-03-07`` daily, ``2025-03`` monthly, ``2025`` yearly)."""
    shape = _PERIOD_SHAPE[tf.period]
    if not isinstance(period, str) or not shape.match(period):
        raise ValueError(f"invalid {tf.period} period {period!r} for timeframe {tf.name}; "
                         f"expected {_PERIOD_HINT[tf.period]}")
    try:
        bounds = tf.period_bounds(period)
    except (ValueError, OverflowError):
        raise ValueError(f"invalid {tf.period} period {period!r} for timeframe {tf.name}; "
                         f"expected {_PERIOD_HINT[tf.period]}") from None
    if tf.period_key(bounds[0]) != period:
        raise ValueError(f"invalid period {period!r} for timeframe {tf.name}: not canonical")
    return bounds


def _as_utc(t: datetime | date | pd.Timestamp | str) -> pd.Timestamp:
    if isinstance(t, str):
        t = pd.Timestamp(t)
    if isinstance(t, date) and not isinstance(t, datetime):
        return pd.Timestamp(t.year, t.month, t.day, tz=UTC)
    ts = pd.Timestamp(t)
    if ts.tzinfo is None:
        raise ValueError(f"naive datetime {t!r}: pass timezone-aware times (UTC inside)")
    return ts.tz_convert(UTC)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date | pd.Timestamp):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metadata value {value!r} is not JSON serialisable")


def _read_bars_table(path: Path) -> pa.Table:
    """A bar file's bar columns, with the schema's metadata (for :func:`read_bar_file`)."""
    return pq.read_table(path, columns=SCHEMA.names)


def _fsync_dir(path: Path) -> None:
    """Persist a rename: on POSIX the directory entry must be synced too."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_table(table: pa.Table, sink: Any, row_groups: list[int] | None = None) -> None:
    """Encode ``table`` as Parquet into the open binary file ``sink``; ``row_groups``: the
    row offsets where a new row group starts (:func:`day_row_groups`), else one group.

    Timestamps and counts are delta-encoded, prices and WAP dictionary-encoded, volume
    byte-stream-split, and everything LZ4 compressed (Parquet's ``LZ4_RAW``, which DuckDB,
    Polars and pyarrow read). Volume's values are whole numbers of shares: split into byte
    streams, their sign and exponent bytes lie together and LZ4 compresses them to 200 KB
    for a symbol-year of minute bars (340 KB as a dictionary), which also decode about a
    quarter faster. LZ4 rather than zstd: on one symbol-year of 1-minute bars the files
    decode about a third faster (8.2 vs 12.5 ms for the 12 files) for 24 % more bytes
    (1.83 vs 1.47 MB, still about half of ArcticDB's 3.2 MB); see
    ``benchmarks/results/read.md``. Files written before with other encodings or zstd stay
    readable (encodings and codec are per file).

    The Arrow schema is not stored in the footer (``store_schema=False``): Parquet's own
    types say the same for these columns (``ts`` is a UTC-adjusted microsecond timestamp,
    read back as ``timestamp[us, tz=UTC]``), and not parsing it saves about a tenth of a
    12-file read. The table's key-value metadata (the store's ``ktrdr`` JSON) is written
    explicitly, since without the Arrow schema pyarrow would drop it. A separate function
    so tests can make it fail midway.
    """
    options: dict[str, Any] = dict(
        compression="lz4", use_dictionary=[c for c in FLOAT_COLUMNS if c != "volume"],
        column_encoding={"ts": "DELTA_BINARY_PACKED", "bar_count": "DELTA_BINARY_PACKED",
                         "volume": "BYTE_STREAM_SPLIT"},
        write_statistics=True, store_schema=False)
    starts = row_groups or [0]
    with pq.ParquetWriter(sink, table.schema, **options) as writer:
        for a, b in zip(starts, [*starts[1:], table.num_rows], strict=True):
            writer.write_table(table.slice(a, b - a), row_group_size=max(b - a, 1))
        if table.schema.metadata:
            writer.add_key_value_metadata(table.schema.metadata)


def day_row_groups(tf: Timeframe, ts_us: np.ndarray) -> list[int] | None:
    """Where a seconds timeframe's month starts a new day (exchange time, as the daily
    files of before were cut): one row group per day, so a reader of one day reads one
    group (its ``ts`` statistics let DuckDB and pyarrow skip the others). None for other
    timeframes (one row group)."""
    if tf.seconds >= 60 or tf.period != "monthly" or not len(ts_us):
        return None
    local = pd.DatetimeIndex(pd.to_datetime(ts_us, unit="us", utc=True)).tz_convert(tf.tz)
    day = local.normalize().asi8
    return [0, *(np.flatnonzero(day[1:] != day[:-1]) + 1).tolist()]


class BarStore:
    """Bars of every timeframe, symbol and period under ``data_dir/bars``.

    Frames are pandas DataFrames indexed by a UTC ``DatetimeIndex`` named ``ts`` with the
    columns of :data:`ktrdr_pipeline.domain.bars.BAR_COLUMNS` (the bar frame of
    :mod:`ktrdr_pipeline.domain.bars`). The store is safe for concurrent
    readers and writers: readers see whole files, writers of one partition take turns
    under ``lock`` (default: :class:`~.locks.FilePartitionLock` files under
    ``data_dir/locks``, one machine), and a read-merge-write that holds :meth:`locked`
    around its re-read and its write loses nobody's bars.
    """

    def __init__(self, data_dir: Path | str, *, lock: PartitionLock | None = None,
                 manifest: PartitionManifest | None = None):
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "bars"
        self.lock: PartitionLock = lock if lock is not None else FilePartitionLock(data_dir)
        self.manifest: PartitionManifest = manifest if manifest is not None else \
            SqliteManifest(self.data_dir / MANIFEST_FILE)
        self._held = threading.local()  # partitions this thread holds (re-entrancy)
        self._swept: set[tuple[str, str]] = set()  # (timeframe, symbol) swept of leftovers
        self._swept_guard = threading.Lock()

    def __repr__(self) -> str:
        return f"BarStore({str(self.data_dir)!r})"

    # -- paths ----------------------------------------------------------------------------
    def _validated(self, tf: str | Timeframe, symbol: str,
                   period: str) -> tuple[Timeframe, Path, tuple[datetime, datetime]]:
        timeframe = check_timeframe(tf)
        check_storage_key(symbol)
        bounds = check_period(timeframe, period)
        directory = (self.root / f"timeframe={timeframe.name}" / f"symbol={symbol}"
                     / f"period={period}")
        return timeframe, directory / FILE_NAME, bounds

    def path(self, tf: str | Timeframe, symbol: str, period: str) -> Path:
        """Where the partition's file lives (it need not exist). Raises ``ValueError`` for
        an unknown timeframe, a symbol that is not a storage key or a malformed period."""
        return self._validated(tf, symbol, period)[1]

    # -- reading --------------------------------------------------------------------------
    def read(self, tf: str | Timeframe, symbol: str, period: str) -> pd.DataFrame:
        """The partition's bars (an empty frame when it was never written)."""
        return self.read_with_meta(tf, symbol, period)[0]

    def read_with_meta(self, tf: str | Timeframe, symbol: str,
                       period: str) -> tuple[pd.DataFrame, PartitionMeta | None]:
        """The partition's bars and its metadata (:meth:`read_meta`) from one read of the
        file; an empty frame and None when it was never written."""
        path = self.path(tf, symbol, period)
        table = read_bar_file(path, _read_bars_table, missing_ok=True)
        if table is None:
            return empty_bars(), None
        return _table_to_frame(table), _meta_of(table.schema)

    def read_meta(self, tf: str | Timeframe, symbol: str, period: str) -> PartitionMeta | None:
        """The metadata written with the partition, or None when it does not exist."""
        schema = read_bar_file(self.path(tf, symbol, period), pq.read_schema, missing_ok=True)
        return None if schema is None else _meta_of(schema)

    def read_range(self, tf: str | Timeframe, symbol: str, start: datetime | date,
                   end: datetime | date) -> pd.DataFrame:
        """Bars with ``start <= ts < end`` across periods (dates mean 00:00 UTC)."""
        timeframe = check_timeframe(tf)
        check_storage_key(symbol)
        lo, hi = _as_utc(start), _as_utc(end)
        frames = []
        for _, _, period in self.partitions(timeframe.name, symbol):
            p_lo, p_hi = timeframe.period_bounds(period)
            if p_hi <= lo or p_lo >= hi:
                continue
            frame = self.read(timeframe, symbol, period)
            frames.append(frame[(frame.index >= lo) & (frame.index < hi)])
        frames = [f for f in frames if len(f)]
        if not frames:
            return empty_bars()
        return pd.concat(frames).sort_index()

    def partitions(self, tf: str | Timeframe | None = None,
                   symbol: str | None = None) -> list[tuple[str, str, str]]:
        """Existing partitions as sorted ``(timeframe, symbol, period)`` tuples, optionally
        of one timeframe and/or symbol. Directories that are not valid partitions (and
        temporary files) are ignored."""
        tf_names = [check_timeframe(tf).name] if tf is not None else None
        if symbol is not None:
            check_storage_key(symbol)
        found: list[tuple[str, str, str]] = []
        for tf_name, tf_dir in self._children(self.root, "timeframe", tf_names):
            timeframe = TIMEFRAMES.get(tf_name)
            if timeframe is None:
                continue
            syms = [symbol] if symbol is not None else None
            for sym, sym_dir in self._children(tf_dir, "symbol", syms):
                try:
                    check_storage_key(sym)
                except ValueError:
                    log.debug("ignoring %s: not a valid symbol", sym_dir)
                    continue
                for period, p_dir in self._children(sym_dir, "period", None):
                    if not (p_dir / FILE_NAME).is_file():
                        continue
                    try:
                        check_period(timeframe, period)
                    except ValueError:
                        log.debug("ignoring %s: not a valid period", p_dir)
                        continue
                    found.append((tf_name, sym, period))
        order = {name: i for i, name in enumerate(TIMEFRAMES)}
        return sorted(found, key=lambda p: (order[p[0]], p[1], p[2]))

    @staticmethod
    def _children(parent: Path, key: str, only: list[str] | None) -> list[tuple[str, Path]]:
        if only is not None:
            return [(v, parent / f"{key}={v}") for v in only if (parent / f"{key}={v}").is_dir()]
        try:
            entries = list(os.scandir(parent))
        except FileNotFoundError:
            return []
        prefix = f"{key}="
        return [(e.name[len(prefix):], Path(e.path)) for e in entries
                if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False)]

    def symbols(self, tf: str | Timeframe | None = None) -> list[str]:
        """Symbols with at least one partition (of timeframe ``tf`` when given), sorted."""
        return sorted({sym for _, sym, _ in self.partitions(tf)})

    def timeframes(self) -> list[str]:
        """Timeframes with at least one partition, in registry order."""
        return list(dict.fromkeys(t for t, _, _ in self.partitions()))

    # -- locking --------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, tf: str | Timeframe, symbol: str, period: str) -> Iterator[None]:
        """Hold the partition's write lock for the ``with`` block: no other writer (in
        this or another process) writes the partition meanwhile, so what is read inside
        the block is what the write inside it replaces. Re-entrant within a thread
        (:meth:`write` inside the block does not lock again); keep the block free of
        slow work (no IB requests) and of ``await`` (coroutines share the thread)."""
        timeframe, _, _ = self._validated(tf, symbol, period)
        key = (timeframe.name, symbol, period)
        held: set[tuple[str, str, str]] = self._held.__dict__.setdefault("keys", set())
        if key in held:
            yield
            return
        with self.lock.hold(*key):
            held.add(key)
            try:
                yield
            finally:
                held.discard(key)

    # -- writing --------------------------------------------------------------------------
    def write(self, tf: str | Timeframe, symbol: str, period: str, frame: pd.DataFrame, *,
              use_rth: bool, what_to_show: str, fetch: FetchState | None = None,
              extra_meta: Mapping[str, Any] | None = None) -> Path:
        """Replace the partition with ``frame``, atomically; returns the file's path.

        ``frame`` must hold only bars of the period, sorted by ``ts`` without duplicates
        (the caller merges and de-duplicates); otherwise ``ValueError`` and nothing is
        written. ``fetch`` (what the load learnt from IB) and ``extra_meta``
        (JSON-serialisable values) are stored next to ``use_rth`` and ``what_to_show`` in
        the file's metadata (:class:`~ktrdr_pipeline.domain.bars.PartitionMeta`).
        """
        timeframe, path, (lo, hi) = self._validated(tf, symbol, period)
        if not isinstance(use_rth, bool | np.bool_):
            raise ValueError(f"use_rth must be a bool, not {use_rth!r}")
        if not isinstance(what_to_show, str) or not what_to_show.strip():
            raise ValueError(f"what_to_show must be a non-empty string, not {what_to_show!r}")
        extra = dict(extra_meta or {})
        clash = RESERVED_META.intersection(extra)
        if clash:
            raise ValueError(f"extra_meta may not set reserved keys: {', '.join(sorted(clash))}")
        table = _frame_to_table(frame, lo, hi, f"{timeframe.name} {symbol} {period}")
        meta = {
            **extra, **(fetch.as_meta() if fetch is not None else {}),
            "format_version": FORMAT_VERSION, "timeframe": timeframe.name, "symbol": symbol,
            "period": period, "use_rth": bool(use_rth), "what_to_show": what_to_show.strip(),
            "rows": table.num_rows, "written_at": datetime.now(UTC).isoformat(),
        }
        encoded = json.dumps(meta, default=_json_default, sort_keys=True).encode()
        table = table.replace_schema_metadata({META_KEY: encoded})
        directory = path.parent
        self._sweep_once(timeframe.name, symbol)
        with self.locked(timeframe, symbol, period):
            directory.mkdir(parents=True, exist_ok=True)
            self._clean_stale_tmp(directory)
            token = self.manifest.begin_write(timeframe.name, symbol, period, self._has_files)
            tmp = directory / f"{FILE_NAME}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
            ts = table.column("ts").cast(pa.int64()).to_numpy()
            groups = day_row_groups(timeframe, ts)
            try:
                with open(tmp, "xb") as fh:
                    if groups is None:
                        _write_table(table, fh)
                    else:
                        _write_table(table, fh, groups)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            _fsync_dir(directory)
            self.manifest.put(self._entry(timeframe.name, symbol, period, path, ts,
                                          json.loads(encoded)), token=token)
        log.debug("wrote %d bars to %s", table.num_rows, path)
        return path

    def delete(self, tf: str | Timeframe, symbol: str, period: str) -> bool:
        """Remove the partition atomically (renamed away, then unlinked); True if it
        existed. Its directory is removed when empty."""
        path = self.path(tf, symbol, period)
        directory = path.parent
        doomed = directory / f"{FILE_NAME}.{os.getpid()}.{secrets.token_hex(6)}.deleted.tmp"
        timeframe = check_timeframe(tf).name
        with self.locked(tf, symbol, period):
            token = self.manifest.begin_write(timeframe, symbol, period, self._has_files)
            try:
                os.replace(path, doomed)
            except FileNotFoundError:
                self.manifest.delete(timeframe, symbol, period, token=token)
                return False
            doomed.unlink()
            _fsync_dir(directory)
            self.manifest.delete(timeframe, symbol, period, token=token)
            self._clean_stale_tmp(directory)
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty
        log.debug("deleted %s", path)
        return True

    # -- the manifest ---------------------------------------------------------------------
    def _has_files(self) -> bool:
        return next(self.root.glob(f"timeframe=*/symbol=*/period=*/{FILE_NAME}"), None) \
            is not None

    def _entry(self, tf_name: str, symbol: str, period: str, path: Path, ts: np.ndarray,
               meta: Mapping[str, Any]) -> ManifestEntry:
        """The manifest row of a file just written (or read): ``ts`` its bar starts (epoch
        µs, sorted), ``meta`` its metadata JSON."""
        st = path.stat()
        parsed = PartitionMeta.from_json(meta)
        partial = parsed.partial_from
        completed = ts if partial is None else ts[ts < partial * 1_000_000]
        return ManifestEntry(
            timeframe=tf_name, symbol=symbol, period=period, rows=len(ts),
            first_bar=int(ts[0]) if len(ts) else None,
            last_bar=int(ts[-1]) if len(ts) else None,
            last_completed=int(completed[-1]) if len(completed) else None,
            use_rth=parsed.use_rth, what_to_show=parsed.what_to_show,
            path=path.relative_to(self.data_dir).as_posix(), size=st.st_size,
            mtime_ns=st.st_mtime_ns, meta_json=json.dumps(parsed.to_json(), sort_keys=True,
                                                          default=_json_default))

    def entry_from_file(self, tf: str | Timeframe, symbol: str,
                        period: str) -> ManifestEntry | None:
        """The partition's manifest row as its file says (the footer; the ``ts`` column
        only when the bar in progress at the fetch must be told apart); None when the
        partition does not exist."""
        timeframe, path, _ = self._validated(tf, symbol, period)
        footer = read_bar_file(path, pq.read_metadata, missing_ok=True)
        if footer is None:
            return None
        raw = (footer.metadata or {}).get(META_KEY)
        meta = {} if raw is None else json.loads(raw)
        meta.update(timeframe=timeframe.name, symbol=symbol, period=period)
        ends = _ts_bounds(footer)
        partial = PartitionMeta.from_json(meta).partial_from
        if ends is not None and (partial is None or ends[1] < partial * 1_000_000):
            ts = np.array(ends if footer.num_rows > 1 else ends[:1], dtype=np.int64)
            entry = self._entry(timeframe.name, symbol, period, path, ts, meta)
            return dataclasses.replace(entry, rows=footer.num_rows)
        table = pq.read_table(path, columns=["ts"])
        return self._entry(timeframe.name, symbol, period, path,
                           table.column("ts").cast(pa.int64()).to_numpy(), meta)

    def _ensure_manifest(self) -> None:
        """Rebuild the manifest when it is missing or incomplete while files exist."""
        if self.manifest.complete() or not self._has_files():
            return
        log.warning("the partition manifest %s is missing or incomplete: rebuilding it from "
                    "the Parquet files (`ktrdr-pipeline manifest rebuild` does the same)",
                    self.manifest)
        self.rebuild_manifest()

    def _settle_intents(self) -> dict[Key, ManifestEntry | None]:
        """Repair the rows of writers that died between their rename and their row (under
        the partition's lock, from the file); returns the partitions live writers are
        replacing right now, as their files say."""
        in_flight: dict[Key, ManifestEntry | None] = {}
        for intent in self.manifest.intents():
            tf_name, symbol, period = intent.key
            if intent.abandoned():
                log.info("repairing the manifest row of %s %s %s: its writer (pid %d on %s) "
                         "died mid-write", symbol, tf_name, period, intent.pid, intent.host)
                with self.locked(tf_name, symbol, period):
                    entry = self.entry_from_file(tf_name, symbol, period)
                    if entry is None:
                        self.manifest.delete(tf_name, symbol, period, token=intent.token)
                    else:
                        self.manifest.put(entry, token=intent.token)
            else:
                in_flight[intent.key] = self.entry_from_file(tf_name, symbol, period)
        return in_flight

    def entries(self, tf: str | Timeframe | None = None, symbol: str | None = None,
                periods: list[str] | None = None) -> list[ManifestEntry]:
        """What the manifest knows of the stored partitions (of ``tf``, ``symbol`` and
        ``periods`` when given), sorted by timeframe, symbol and period, without opening a
        Parquet file: rebuilt first when missing, rows of dead writers repaired, partitions
        being written right now read from their files."""
        tf_name = check_timeframe(tf).name if tf is not None else None
        if symbol is not None:
            check_storage_key(symbol)
        self._ensure_manifest()
        in_flight = self._settle_intents()
        found = {e.key: e for e in self.manifest.scan(tf_name, symbol, periods)}
        for key, entry in in_flight.items():
            if ((tf_name is None or key[0] == tf_name) and (symbol is None or key[1] == symbol)
                    and (periods is None or key[2] in periods)):
                if entry is None:
                    found.pop(key, None)
                else:
                    found[key] = entry
        order = {name: i for i, name in enumerate(TIMEFRAMES)}
        return sorted(found.values(), key=lambda e: (order.get(e.timeframe, -1), e.symbol,
                                                     e.period))

    def entry(self, tf: str | Timeframe, symbol: str, period: str) -> ManifestEntry | None:
        """The manifest's row of one partition (see :meth:`entries`); None when absent."""
        check_period(check_timeframe(tf), period)
        found = self.entries(tf, symbol, [period])
        return found[0] if found else None

    def coverage(self) -> list[CoverageRow]:
        """Per symbol and timeframe: first and last bar, rows and partitions holding bars,
        from the manifest (no Parquet file is opened)."""
        self._ensure_manifest()
        self._settle_intents()
        return self.manifest.coverage()

    def rebuild_manifest(self) -> int:
        """Rebuild the manifest from the Parquet footers (writers may keep writing: rows
        they replace meanwhile are re-read, see :meth:`.manifest.SqliteManifest.rebuild`);
        returns how many partitions it lists."""
        entries = [e for t, s, p in self.partitions()
                   if (e := self.entry_from_file(t, s, p)) is not None]

        def recheck(key: Key, entry: ManifestEntry | None) -> ManifestEntry | None:
            path = self.path(*key)
            try:
                st = path.stat()
            except FileNotFoundError:
                return None
            if entry is not None and (st.st_size, st.st_mtime_ns) == (entry.size,
                                                                     entry.mtime_ns):
                return entry
            return self.entry_from_file(*key)

        self.manifest.rebuild(entries, recheck, keep_intents=lambda i: not i.abandoned())
        log.info("manifest %s rebuilt: %d partitions", self.manifest, len(entries))
        return len(entries)

    def check_manifest(self) -> list[str]:
        """Where the manifest and the files disagree, one line each (empty: they agree):
        partitions without a row, rows without a file, rows whose file changed since
        (size, modification time) or whose content differs from the file's footer."""
        problems: list[str] = []
        if not self.manifest.complete():
            problems.append(f"the manifest {self.manifest} is missing or incomplete")
        rows = {e.key: e for e in self.manifest.scan()}
        files = self.partitions()
        for key in files:
            what = " ".join((key[1], key[0], key[2]))
            row = rows.pop(key, None)
            actual = self.entry_from_file(*key)
            if actual is None:
                continue  # deleted since the listing
            if row is None:
                problems.append(f"{what}: stored, but not in the manifest")
            elif (row.size, row.mtime_ns) != (actual.size, actual.mtime_ns):
                problems.append(f"{what}: the file changed since its manifest row was written "
                                f"(size {row.size} -> {actual.size})")
            elif row != actual:
                diff = [f.name for f in dataclasses.fields(row)
                        if getattr(row, f.name) != getattr(actual, f.name)]
                problems.append(f"{what}: the manifest row differs from the file in "
                                f"{', '.join(diff)}")
        for key in rows:
            problems.append(f"{key[1]} {key[0]} {key[2]}: in the manifest, but no file")
        legacy = sum(len(v) for v in self.legacy_daily_files().values())
        if legacy:
            problems.append(f"{legacy} daily file(s) of seconds bars from before monthly "
                            "periods, ignored by readers: `ktrdr-pipeline migrate` folds them "
                            "into their months")
        for intent in self.manifest.intents():
            state = "dead" if intent.abandoned() else "live"
            problems.append(f"{intent.symbol} {intent.timeframe} {intent.period}: a write in "
                            f"flight by a {state} writer (pid {intent.pid} on {intent.host})")
        return problems

    # -- daily files of seconds bars (before issue 15) -------------------------------------
    def legacy_daily_files(self) -> dict[Key, list[Path]]:
        """Files of timeframes now split by month still in daily directories
        (``period=YYYY-MM-DD``: seconds bars written before issue 15), per (timeframe,
        symbol, month), in day order. Readers ignore them until :meth:`migrate_daily_files`
        folds them into their months."""
        found: dict[Key, list[Path]] = {}
        for tf_name, tf_dir in self._children(self.root, "timeframe", None):
            timeframe = TIMEFRAMES.get(tf_name)
            if timeframe is None or timeframe.period != "monthly":
                continue
            for sym, sym_dir in self._children(tf_dir, "symbol", None):
                try:
                    check_storage_key(sym)
                except ValueError:
                    continue
                for period, p_dir in sorted(self._children(sym_dir, "period", None)):
                    if _PERIOD_SHAPE["daily"].match(period) and (p_dir / FILE_NAME).is_file():
                        found.setdefault((tf_name, sym, period[:7]), []).append(
                            p_dir / FILE_NAME)
        return found

    def migrate_daily_files(self) -> int:
        """Fold every daily file of a monthly timeframe into its month (one row group per
        day), then remove the daily files; returns how many were folded. Crash-safe and
        repeatable: the month is written atomically first (under its lock, merged with what
        the month holds already, whose bars win), the daily files removed after; a run
        killed in between folds the remaining ones again next time. The fetch states are
        merged: IB asked up to the latest ``asked_until``, the earliest bar in progress
        (``partial_from``) stays incomplete, the known-empty spans are united."""
        folded = 0
        for (tf_name, symbol, month), paths in sorted(self.legacy_daily_files().items()):
            with self.locked(tf_name, symbol, month):
                frames, metas = [], []
                for path in paths:
                    table = read_bar_file(path, _read_bars_table)
                    frames.append(_table_to_frame(table))
                    metas.append(_meta_of(table.schema))
                current, meta = self.read_with_meta(tf_name, symbol, month)
                if meta is not None:
                    frames.append(current)
                    metas.append(meta)
                merged = pd.concat(frames)
                merged = merged[~merged.index.duplicated(keep="last")].sort_index()
                newest = metas[-1]
                self.write(tf_name, symbol, month, merged, use_rth=newest.use_rth,
                           what_to_show=newest.what_to_show, fetch=_merged_fetch(metas),
                           extra_meta={k: v for k, v in newest.extra.items()
                                       if k not in RESERVED_META})
                for path in paths:
                    doomed = path.with_name(
                        f"{FILE_NAME}.{os.getpid()}.{secrets.token_hex(6)}.deleted.tmp")
                    os.replace(path, doomed)
                    doomed.unlink()
                    _fsync_dir(path.parent)
                    with contextlib.suppress(OSError):
                        path.parent.rmdir()
                    self.manifest.delete(tf_name, symbol, path.parent.name[len("period="):])
            folded += len(paths)
            log.info("folded %d daily file(s) of %s %s into %s", len(paths), symbol, tf_name,
                     month)
        return folded

    # -- leftovers of killed writers -------------------------------------------------------
    def sweep_stale_tmp(self, tf: str | Timeframe | None = None,
                        symbol: str | None = None) -> int:
        """Remove the temporary files dead writers left in every partition directory (of
        ``tf`` and/or ``symbol`` when given); returns how many were removed. Temporary
        files of live writers stay (see :meth:`_clean_stale_tmp`)."""
        tf_names = [check_timeframe(tf).name] if tf is not None else None
        if symbol is not None:
            check_storage_key(symbol)
        removed = 0
        for _, tf_dir in self._children(self.root, "timeframe", tf_names):
            syms = [symbol] if symbol is not None else None
            for _, sym_dir in self._children(tf_dir, "symbol", syms):
                for _, p_dir in self._children(sym_dir, "period", None):
                    removed += self._clean_stale_tmp(p_dir)
        return removed

    def _sweep_once(self, tf_name: str, symbol: str) -> None:
        """The first write of this store to a symbol × timeframe sweeps that symbol's
        partition directories (a kill during the rewrite of another period leaves a
        leftover no later write of *that* period would see soon)."""
        with self._swept_guard:
            if (tf_name, symbol) in self._swept:
                return
            self._swept.add((tf_name, symbol))
        removed = self.sweep_stale_tmp(tf_name, symbol)
        if removed:
            log.info("removed %d temporary file(s) of dead writers under %s/%s", removed,
                     tf_name, symbol)

    @staticmethod
    def _clean_stale_tmp(directory: Path) -> int:
        """Remove temporary files left by killed writers: files of this store's pattern
        whose process is gone (or that are older than an hour), and any other ``*.tmp``;
        returns how many. Temporary files of live concurrent writers are left alone. (The
        pid test holds on one machine; a store shared by several machines relies on the
        age, or on a shared lock's owner.)"""
        now = time.time()
        removed = 0
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not entry.name.endswith(".tmp") or not entry.is_file(follow_symlinks=False):
                continue
            match = _TMP_RE.match(entry.name)
            if match:
                pid = int(match.group(1))
                try:
                    age = now - entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                # a live writer's (this process's other threads included) is left alone
                if pid_alive(pid) and age < STALE_TMP_AGE_S:
                    continue
            log.info("removing stale temporary file %s", entry.path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
        return removed


def _ts_bounds(footer: pq.FileMetaData) -> tuple[int, int] | None:
    """The first and last ``ts`` (epoch µs) from the row groups' statistics; None when the
    file has no rows or no statistics (then the column must be read)."""
    lo = hi = None
    column = footer.schema.names.index("ts") if "ts" in footer.schema.names else None
    if column is None or footer.num_rows == 0:
        return None
    for k in range(footer.num_row_groups):
        group = footer.row_group(k)
        if group.num_rows == 0:
            continue
        stats = group.column(column).statistics
        if stats is None or not stats.has_min_max:
            return None
        a, b = _epoch_us(stats.min), _epoch_us(stats.max)
        lo = a if lo is None else min(lo, a)
        hi = b if hi is None else max(hi, b)
    return None if lo is None or hi is None else (lo, hi)


def _epoch_us(value: Any) -> int:
    if isinstance(value, datetime):
        return (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return int(value)


def _merged_fetch(metas: list[PartitionMeta]) -> FetchState:
    """One fetch state for bars merged from several partitions (oldest first)."""
    asked = [m.asked_until for m in metas if m.asked_until is not None]
    partial = [m.partial_from for m in metas if m.partial_from is not None]
    runs: list[tuple[int, int]] = []
    for a, b in sorted(r for m in metas for r in m.empty_runs):
        if runs and a <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], b))
        else:
            runs.append((a, b))
    return FetchState(con_id=metas[-1].con_id, fetched_at=metas[-1].fetched_at,
                      partial_from=min(partial) if partial else None,
                      asked_until=max(asked) if asked else None, empty_runs=tuple(runs))


def _meta_of(schema: pa.Schema) -> PartitionMeta:
    raw = (schema.metadata or {}).get(META_KEY)
    return PartitionMeta.from_json({} if raw is None else json.loads(raw))


def _frame_to_table(frame: pd.DataFrame, lo: datetime, hi: datetime, what: str) -> pa.Table:
    """Check a bar frame against the partition and convert it to the store's schema."""
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{what}: expected a DataFrame, not {type(frame).__name__}")
    index = frame.index
    if not isinstance(index, pd.DatetimeIndex):
        raise ValueError(f"{what}: the frame must be indexed by a DatetimeIndex 'ts'")
    if index.tz is None:
        raise ValueError(f"{what}: the frame's index is naive; bars are indexed by UTC times")
    index = index.tz_convert(UTC)
    missing = [c for c in BAR_COLUMNS if c not in frame.columns]
    extra = [c for c in frame.columns if c not in BAR_COLUMNS]
    if missing or extra:
        raise ValueError(f"{what}: columns must be {', '.join(BAR_COLUMNS)}; "
                         f"missing {missing}, unexpected {extra}")
    if index.hasnans:
        raise ValueError(f"{what}: NaT in the ts index")
    if len(index):
        dup = index.duplicated(keep=False)
        if dup.any():
            raise ValueError(f"{what}: {int(dup.sum())} rows with duplicate ts, first "
                             f"{index[dup][0].isoformat()}; de-duplicate before writing")
        if not index.is_monotonic_increasing:
            pos = int(np.flatnonzero(np.diff(index.asi8) < 0)[0]) + 1
            raise ValueError(f"{what}: ts not sorted: {index[pos].isoformat()} follows "
                             f"{index[pos - 1].isoformat()}; sort before writing")
        outside = (index < lo) | (index >= hi)
        if outside.any():
            raise ValueError(f"{what}: {int(outside.sum())} rows outside the period "
                             f"[{lo.isoformat()}, {hi.isoformat()}), first "
                             f"{index[outside][0].isoformat()}")
        ns = index.as_unit("ns").asi8
        if (ns % 1000).any():
            raise ValueError(f"{what}: ts with sub-microsecond precision cannot be stored")
    arrays: list[pa.Array] = [
        pa.array(index.as_unit("us").asi8, type=pa.int64()).cast(SCHEMA.field("ts").type)]
    for col in FLOAT_COLUMNS:
        values = frame[col]
        try:
            arrays.append(pa.array(pd.to_numeric(values).to_numpy(dtype="float64",
                                                                   na_value=np.nan),
                                   type=pa.float64()))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what}: column {col!r} is not numeric: {exc}") from None
    counts = frame["bar_count"]
    if counts.isna().any():
        raise ValueError(f"{what}: bar_count has missing values (use 0)")
    as_float = pd.to_numeric(counts).to_numpy(dtype="float64")
    if not np.all(np.mod(as_float, 1) == 0):
        raise ValueError(f"{what}: bar_count must hold whole numbers")
    arrays.append(pa.array(pd.to_numeric(counts).to_numpy().astype(np.int64), type=pa.int64()))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _table_to_frame(table: pa.Table) -> pd.DataFrame:
    if table.num_rows == 0:
        return empty_bars()
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    index = pd.DatetimeIndex(pd.to_datetime(ts, unit="us", utc=True), name="ts").as_unit("ns")
    data = {c: table.column(c).to_numpy().astype("float64", copy=False) for c in FLOAT_COLUMNS}
    data["bar_count"] = table.column("bar_count").to_numpy().astype("int64", copy=False)
    return pd.DataFrame(data, index=index, columns=BAR_COLUMNS)
