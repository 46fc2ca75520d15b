"""Bars into pandas or Arrow for research: :func:`read_bars` and :func:`latest_bars`.

Both read the Parquet files directly with pyarrow (no SQL engine in between), and only
the files they need: the partitions of the symbol whose periods overlap the range
(:func:`read_bars`), each symbol's newest periods (:func:`latest_bars`). Which files exist
comes from :mod:`.files` (the seam for the partition manifest). Columns are decoded only
when asked for; the constant ``symbol`` and ``period`` columns are added only when asked
for; the pandas frame is built from the Arrow columns without a row-wise conversion.

The frames are the store's bar frames (as :meth:`~.parquet.BarStore.read_range` returns
them): a UTC ``DatetimeIndex`` named ``ts`` (nanoseconds) and float64 prices, volume and
WAP (NaN = not available), int64 ``bar_count``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..domain.bars import BAR_COLUMNS
from ..domain.symbols import check_storage_key
from ..domain.timeframes import TIMEFRAMES, Timeframe, get_timeframe
from .bar_file import read_bar_file
from .files import stored_symbols, symbol_periods, timeframe_file_rows

#: Columns one may ask for besides the bar columns (constants of each file's path).
PATH_COLUMNS = ("symbol", "period")
ALLOWED_COLUMNS = (*BAR_COLUMNS, *PATH_COLUMNS)
OUTPUTS = ("pandas", "arrow")
_TS = pa.timestamp("us", tz="UTC")
_TS_NS = pa.timestamp("ns", tz="UTC")
_PANDAS_TS = pd.DatetimeTZDtype("ns", "UTC")
#: Files of before declare the float columns nullable, newer ones required: same values.
_UNIFY = "default"


class BarReadError(ValueError):
    """A request :func:`read_bars` / :func:`latest_bars` cannot answer: the message says
    what was wrong and what is allowed."""


def _data_dir(data_dir: Path | str | None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    from ..settings import Settings

    return Settings.from_env().data_dir


def _timeframe(timeframe: str | Timeframe) -> Timeframe:
    if isinstance(timeframe, Timeframe):
        return timeframe
    if not isinstance(timeframe, str):
        raise BarReadError(f"invalid timeframe {timeframe!r}; allowed: {', '.join(TIMEFRAMES)}")
    try:
        return get_timeframe(timeframe)
    except ValueError as exc:
        raise BarReadError(str(exc)) from None


def _symbol(symbol: str) -> str:
    try:
        return check_storage_key(symbol)
    except ValueError as exc:
        raise BarReadError(f"{exc} (the symbol column's form, e.g. 'AAPL', 'EURUSD')") from None


def _bound(value: datetime | date | str | pd.Timestamp | None, name: str) -> int | None:
    """``value`` as microseconds since the epoch (UTC); dates mean 00:00 UTC."""
    if value is None:
        return None
    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError):
        raise BarReadError(f"invalid {name} {value!r}: expected a date, a timezone-aware "
                           "datetime or an ISO 8601 string with an offset") from None
    if ts is pd.NaT:
        raise BarReadError(f"invalid {name} {value!r}: not a time")
    if ts.tzinfo is None:
        if isinstance(value, date) and not isinstance(value, datetime) or (
                isinstance(value, str) and len(value.strip()) == 10):
            ts = ts.tz_localize(UTC)  # a date: 00:00 UTC, as in BarStore.read_range
        else:
            raise BarReadError(f"naive {name} {value!r}: pass a timezone-aware time (UTC "
                               "inside) or a date")
    return int(ts.tz_convert(UTC).value) // 1000  # .value: nanoseconds, whatever the unit


def _columns(columns: Sequence[str] | None) -> list[str]:
    if columns is None:
        return list(BAR_COLUMNS)
    if isinstance(columns, str):
        columns = [columns]
    wanted = [c for c in columns if c != "ts"]  # ts is always there (the index)
    unknown = [c for c in wanted if c not in ALLOWED_COLUMNS]
    if unknown:
        raise BarReadError(f"unknown column(s) {', '.join(map(repr, unknown))}; allowed: "
                           f"{', '.join(ALLOWED_COLUMNS)} (ts is always included)")
    if len(set(wanted)) != len(wanted):
        raise BarReadError(f"columns named twice: {list(columns)}")
    return wanted


def _output(as_: str) -> str:
    if as_ not in OUTPUTS:
        raise BarReadError(f"unknown output {as_!r}; allowed: {', '.join(OUTPUTS)}")
    return as_


def _file_bytes(path: Path) -> pa.Buffer:
    """A bar file's bytes, in one read: fewer system calls than pyarrow's footer-then-
    column-chunk reads (about 1 ms less for 12 monthly files of 1-minute bars,
    benchmarks/bench_read.py); the files are small (a month). The buffer comes from
    Arrow's memory pool, which keeps its pages between reads: a ``bytes`` of this size is
    a fresh mapping from the kernel every time, whose first touch costs a page fault per
    4 KiB (about 400 for a year of minute bars, 0.8 ms when the process has been idle)."""

    def read(p: Path) -> pa.Buffer:
        with pa.OSFile(str(p)) as fh:
            return fh.read_buffer()

    return read_bar_file(path, read)


#: Parsed footers by their bytes (:func:`_parquet_file`): at most :data:`_FOOTERS_KEPT` of
#: them and :data:`_FOOTER_BYTES_KEPT` bytes of footers (a parsed footer takes about eight
#: times its bytes: ~16 KB for a month of minute bars, ~140 KB for a month of 5-second
#: bars with its row group per day), so at most ~32 MB of a research process's memory.
_FOOTERS: dict[bytes, pq.FileMetaData] = {}
_FOOTERS_KEPT = 1024
_FOOTER_BYTES_KEPT = 4 << 20
_FOOTERS_LOCK = threading.Lock()
_MAGIC = b"PAR1"


def _parquet_file(data: pa.Buffer) -> pq.ParquetFile:
    """A Parquet file in memory, its footer parsed once per process: a footer is looked up
    by its own bytes (a Parquet file ends with the footer, its 4-byte length and ``PAR1``),
    so a file rewritten since, whatever its name, size or time, is parsed afresh, and
    equal bytes describe the file exactly. Parsing is about a fifth of decoding a month of
    minute bars (thrift and the schema, ~70 µs a file); reading the same year twice (a
    notebook cell run again, a backtest over the same symbols) parses nothing the second
    time. A buffer that does not end like a Parquet file goes to pyarrow, whose error
    names what is wrong."""
    size = data.size
    footer = None
    if size >= 12 and data.slice(size - 4).to_pybytes() == _MAGIC:
        length = int.from_bytes(data.slice(size - 8, 4).to_pybytes(), "little")
        if length <= size - 12:
            footer = data.slice(size - 8 - length, length).to_pybytes()
    metadata = _FOOTERS.get(footer) if footer is not None else None
    parquet = pq.ParquetFile(pa.BufferReader(data), metadata=metadata, pre_buffer=False)
    if footer is not None and metadata is None and len(footer) <= _FOOTER_BYTES_KEPT // 8:
        with _FOOTERS_LOCK:  # decoding threads add at once
            kept = sum(map(len, _FOOTERS))
            while _FOOTERS and (len(_FOOTERS) >= _FOOTERS_KEPT
                                or kept + len(footer) > _FOOTER_BYTES_KEPT):
                oldest = next(iter(_FOOTERS))  # dicts keep insertion order
                kept -= len(oldest)
                del _FOOTERS[oldest]
            _FOOTERS[footer] = parquet.metadata
    return parquet


def _read_file(path: Path, columns: list[str], lo: int | None = None,
               hi: int | None = None, data: pa.Buffer | None = None) -> pa.Table:
    """One partition's ``ts`` and ``columns``, cut to [lo, hi) when given; ``data``: the
    file's bytes when already read (:func:`_file_bytes`).

    The store's files are sorted by ``ts`` (:meth:`~.parquet.BarStore.write` refuses
    anything else), so the cut is a binary search and a zero-copy slice, not a mask."""
    if data is None:
        data = _file_bytes(path)
    # decoded from memory, without pre-buffering (the bytes are there already)
    table = read_bar_file(path, lambda _: _parquet_file(data).read(columns=["ts", *columns],
                                                                   use_threads=False))
    if lo is not None or hi is not None:
        us = table.column("ts").cast(pa.int64()).to_numpy()
        a = int(np.searchsorted(us, lo, side="left")) if lo is not None else 0
        b = int(np.searchsorted(us, hi, side="left")) if hi is not None else len(us)
        table = table.slice(a, max(b - a, 0))
    return table


def _with_path_columns(table: pa.Table, columns: list[str], symbol: str,
                       period: str | pa.Array) -> pa.Table:
    n = table.num_rows
    for col in PATH_COLUMNS:
        if col in columns:
            value = symbol if col == "symbol" else period
            array = value if isinstance(value, pa.Array | pa.ChunkedArray) else pa.array(
                [value] * n, pa.string())
            table = table.append_column(col, array)
    return table.select(["ts", *columns])


def _bar_table(files: list[tuple[str, Path]], tf: Timeframe, symbol: str, columns: list[str],
               lo: int | None, hi: int | None) -> pa.Table:
    file_cols = [c for c in columns if c not in PATH_COLUMNS]
    jobs = []
    for period, path in files:
        p_lo, p_hi = (int(pd.Timestamp(b).value) // 1000 for b in tf.period_bounds(period))
        if (hi is not None and p_lo >= hi) or (lo is not None and p_hi <= lo):
            continue  # the period lies outside the range: its file is not opened
        cut_lo = lo if lo is not None and lo > p_lo else None
        cut_hi = hi if hi is not None and hi < p_hi else None
        # every file's bytes first, in this thread: the decoding threads then make no
        # system call (one that releases the GIL while another thread runs Python has to
        # wait for it to be handed back, up to the interpreter's switch interval)
        jobs.append((period, path, cut_lo, cut_hi, _file_bytes(path)))
    if not jobs:
        return _empty_table(columns)

    def one(job: tuple[str, Path, int | None, int | None, pa.Buffer]) -> pa.Table:
        period, path, cut_lo, cut_hi, data = job
        table = _read_file(path, file_cols, cut_lo, cut_hi, data)
        return (_with_path_columns(table, columns, symbol, period)
                if "period" in columns or "symbol" in columns else table)

    return pa.concat_tables(_decode_shared(one, jobs), promote_options=_UNIFY)


_POOL: ThreadPoolExecutor | None = None
#: Threads decoding files at once, the caller's included.
_DECODERS = max(1, min(4, os.cpu_count() or 1))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_DECODERS - 1, thread_name_prefix="read_bars")
    return _POOL


def _decode_shared(one: Callable[[Any], pa.Table], jobs: list[Any]) -> list[pa.Table]:
    """``[one(job) for job in jobs]``, shared out to up to :data:`_DECODERS` threads, the
    caller's included: each takes the next job not yet taken until none is left (one
    hand-off per thread, not one per file: waking a sleeping thread costs more than
    decoding a small file on a busy or virtual machine; and a thread that starts late or is
    preempted simply takes fewer files instead of holding the answer back). pyarrow
    releases the GIL while it decodes, so the threads decode at once. The first failure
    stops every thread at its current file and is raised (the caller's own first)."""
    n = min(_DECODERS, len(jobs))
    if n < 2:
        return [one(job) for job in jobs]
    parts: list[pa.Table] = [None] * len(jobs)  # type: ignore[list-item]
    taking = threading.Lock()  # hands out each job once (no reliance on the GIL)
    untaken = iter(range(len(jobs)))
    failed = threading.Event()  # after a failure nobody takes another job

    def work() -> None:
        while not failed.is_set():
            with taking:
                k = next(untaken, None)
            if k is None:
                return
            try:
                parts[k] = one(jobs[k])
            except BaseException:
                failed.set()
                raise

    helpers = [_pool().submit(work) for _ in range(n - 1)]
    try:
        work()
    except BaseException:
        for helper in helpers:  # they stop at their current file; the caller's error wins
            helper.exception()
        raise
    for helper in helpers:
        helper.result()  # a helper's failure is the caller's
    return parts


def _empty_table(columns: list[str]) -> pa.Table:
    types = {"bar_count": pa.int64(), "symbol": pa.string(), "period": pa.string()}
    return pa.table({"ts": pa.array([], _TS),
                     **{c: pa.array([], types.get(c, pa.float64())) for c in columns}})


def _writable_numpy(array: pa.Array) -> np.ndarray:
    """``array``'s values as a numpy array its caller may change, as a pandas frame's column
    must be (``df.loc[...] = x``): a view of the Arrow buffer when it is mutable and holds
    no nulls, else a copy (nulls become NaN). Arrow's own ``to_numpy`` views are read-only.

    The view writes into the Arrow buffer: pass only arrays nothing else will read (here:
    columns just decoded from a file's bytes, or joined or cast from those, of a table
    about to be dropped)."""
    values = array.buffers()[1] if array.null_count == 0 else None
    dtype = np.dtype(array.type.to_pandas_dtype())
    if values is not None and values.is_mutable and dtype.kind in "fi":
        return np.frombuffer(values, dtype=dtype, count=len(array),
                             offset=array.offset * dtype.itemsize)
    return array.to_numpy(zero_copy_only=False, writable=True)


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _to_pandas(table: pa.Table, index: bool = True) -> pd.DataFrame:
    """A bar frame from an Arrow table of ``ts`` and bar columns (no row-wise work).

    The chunks (one per file) are joined first: one copy per column into contiguous
    buffers, which pandas then takes as they are (about a third of the time of converting
    a 12-chunk column, measured in ``benchmarks/bench_read.py``). The index wraps the
    joined nanoseconds as they are (``pd.array`` of epoch integers with a UTC dtype):
    building it from naive times and ``tz_localize`` copies them and takes ~0.9 ms for a
    year of minute bars under pandas 3, this ~15 µs. The numeric buffers stay in Arrow's
    memory pool (no page faults; see :func:`_file_bytes`), and every column is the
    caller's to change (:func:`_writable_numpy`), ``ts`` included where it is a column
    (``index=False``)."""
    table = table.combine_chunks()
    epoch_ns = _writable_numpy(_one_chunk(table.column("ts").cast(_TS_NS).cast(pa.int64())))
    times = pd.DatetimeIndex(pd.array(epoch_ns, dtype=_PANDAS_TS, copy=False), name="ts",
                             copy=False)
    data: dict[str, Any] = {}
    for name in table.column_names[1:]:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            data[name] = col.to_pandas().array  # no index: aligned by position
        else:
            data[name] = _writable_numpy(_one_chunk(col))
    if index:
        return pd.DataFrame(data, index=times, copy=False)
    return pd.DataFrame({"ts": times, **data}, copy=False)


def read_bars(symbol: str, timeframe: str | Timeframe,
              start: datetime | date | str | None = None,
              end: datetime | date | str | None = None, *,
              columns: Sequence[str] | None = None, as_: str = "pandas",
              data_dir: Path | str | None = None) -> Any:
    """The stored bars of ``symbol`` at ``timeframe`` with ``start <= ts < end``, as a
    pandas DataFrame (index ``ts``) or, with ``as_="arrow"``, a ``pyarrow.Table`` (``ts``
    first).

    ``start``/``end``: a timezone-aware datetime, a date (00:00 UTC, as
    :meth:`~.parquet.BarStore.read_range`), an ISO 8601 string with an offset, or None
    (from the first / to the last stored bar). ``columns``: any of ``open``, ``high``,
    ``low``, ``close``, ``volume``, ``wap``, ``bar_count`` (default all of them), plus
    ``symbol`` and ``period`` when wanted. ``data_dir`` defaults to ``KTRDR_DATA_DIR``.
    Only the partitions whose periods overlap the range are opened, and only the asked
    columns decoded. A symbol with nothing stored at ``timeframe`` is a
    :class:`BarReadError` naming the symbols that have bars; a range with no bars is an
    empty frame.
    """
    tf = _timeframe(timeframe)
    symbol = _symbol(symbol)
    lo, hi = _bound(start, "start"), _bound(end, "end")
    if lo is not None and hi is not None and lo >= hi:
        raise BarReadError(f"empty range: start {start!r} is not before end {end!r} "
                           "(bars with start <= ts < end)")
    cols = _columns(columns)
    _output(as_)
    root = _data_dir(data_dir)
    files = symbol_periods(root, tf.name, symbol)
    if not files:
        stored = stored_symbols(root, tf.name)
        raise BarReadError(f"no {tf.name} bars stored for symbol {symbol!r} under {root}; "
                           f"symbols with {tf.name} bars: {', '.join(stored) or 'none'}")
    table = _bar_table(files, tf, symbol, cols, lo, hi)
    return table if as_ == "arrow" else _to_pandas(table)


def _newest_files(files: list[tuple[str, str, int | None]],
                  n: int) -> list[tuple[str, Path]]:
    """The newest partitions holding at least ``n`` bars together (all when fewer); row
    counts from the manifest, else (None) from the Parquet footers."""
    picked: list[tuple[str, Path]] = []
    total = 0
    for period, file, rows in reversed(files):
        if total >= n:
            break
        path = Path(file)
        picked.append((period, path))
        total += rows if rows is not None else read_bar_file(path, pq.read_metadata).num_rows
    return picked[::-1]


def recent_files(data_dir: Path | str, timeframe: str, n: int) -> list[Path]:
    """Per symbol of ``timeframe``, the files of its newest periods that hold its last
    ``n`` bars (what ``latest_bars`` reads): one manifest query, no file opened, when the
    manifest is settled."""
    out: list[Path] = []
    for periods in timeframe_file_rows(data_dir, timeframe).values():
        out += [p for _, p in _newest_files(periods, n)]
    return out


def latest_bars(timeframe: str | Timeframe, n: int, *, symbols: Sequence[str] | None = None,
                columns: Sequence[str] | None = None, as_: str = "pandas",
                data_dir: Path | str | None = None) -> Any:
    """The last ``n`` stored bars of every symbol (or of ``symbols``) at ``timeframe``,
    reading only each symbol's newest periods: a frame (or ``pyarrow.Table``) with the
    columns ``symbol``, ``ts`` and the bar columns (``columns`` as in :func:`read_bars`),
    sorted by symbol and time. The ``sql`` command's ``latest_bars('<tf>', n)`` macro
    returns the same bars."""
    tf = _timeframe(timeframe)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise BarReadError(f"invalid number of bars {n!r}: an integer >= 0")
    cols = [c for c in _columns(columns) if c != "symbol"]
    _output(as_)
    root = _data_dir(data_dir)
    universe = timeframe_file_rows(root, tf.name)  # one manifest query, not one per symbol
    stored = list(universe)
    if symbols is None:
        wanted = stored
    else:
        wanted = [_symbol(s) for s in ([symbols] if isinstance(symbols, str) else symbols)]
        missing = [s for s in wanted if s not in universe]
        if missing:
            raise BarReadError(f"no {tf.name} bars stored for {', '.join(map(repr, missing))}; "
                               f"symbols with {tf.name} bars: {', '.join(stored) or 'none'}")
    file_cols = [c for c in cols if c not in PATH_COLUMNS]
    # every symbol's newest files holding its last n bars (counts from the manifest), read
    # here, then decoded by the decoding threads at once
    jobs = [(symbol, period, path, _file_bytes(path)) for symbol in wanted
            for period, path in (_newest_files(universe[symbol], n) if n else [])]
    decoded = _decode_shared(lambda job: _with_path_columns(
        _read_file(job[2], file_cols, data=job[3]), cols, job[0], job[1]), jobs)
    by_symbol: dict[str, list[pa.Table]] = {}
    for job, table in zip(jobs, decoded, strict=True):
        by_symbol.setdefault(job[0], []).append(table)
    parts = []
    for symbol in wanted:
        tables = by_symbol.get(symbol, [])
        table = (pa.concat_tables(tables, promote_options=_UNIFY) if tables
                 else _empty_table(cols))
        table = table.slice(max(table.num_rows - n, 0))
        parts.append(table.add_column(0, "symbol", pa.array([symbol] * table.num_rows,
                                                            pa.string())))
    if not parts:
        empty = _empty_table(cols)
        parts = [empty.add_column(0, "symbol", pa.array([], pa.string()))]
    table = pa.concat_tables(parts, promote_options=_UNIFY)
    if as_ == "arrow":
        return table
    frame = _to_pandas(table.select(["ts", *[c for c in table.column_names if c != "ts"]]),
                       index=False)
    return frame[["symbol", "ts", *cols]]


__all__ = ["ALLOWED_COLUMNS", "BarReadError", "latest_bars", "read_bars", "recent_files"]
