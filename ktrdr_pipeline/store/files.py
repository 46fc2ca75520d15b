"""Which Parquet files hold the bars of a timeframe, a symbol, a period: the one place
readers (the ``sql`` views, :func:`~ktrdr_pipeline.store.read.read_bars`) ask.

The answers come from the partition manifest (:mod:`.manifest`) when it is settled
(complete, this version, no write in flight): one SQLite query, no directory listed, so a
one-symbol query at 2,000 symbols opens that symbol's files and nothing else. Otherwise
(no manifest yet, a write in flight, a manifest to rebuild) they come from the directory
layout of :mod:`.parquet` (``bars/timeframe=<tf>/symbol=<SYM>/period=<key>/data.parquet``):
DuckDB globs for the views, one directory listing for a symbol's periods. Both give the
same files; readers never repair the manifest here (the store's own reads and ``manifest
rebuild`` do), so a reader never waits on a rebuild.

Light on purpose (no pandas, no pyarrow, no DuckDB): the ``sql`` command imports it at
start-up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..domain.symbols import STORAGE_KEY_PATTERN
from ..domain.timeframes import TIMEFRAMES
from .manifest import MANIFEST_FILE, SqliteManifest

FILE_NAME = "data.parquet"
_GLOB_CHARS = "*?[]{}"


def bars_root(data_dir: Path | str) -> Path:
    """The absolute directory holding every bar file."""
    return Path(data_dir).resolve() / "bars"


def _root_text(data_dir: Path | str) -> str:
    root = bars_root(data_dir).as_posix()
    if any(ch in root for ch in _GLOB_CHARS):
        raise ValueError(f"data directory {root!r} contains glob characters (*?[]{{}}); "
                         "DuckDB cannot read Parquet files below it — choose another path")
    return root


def glob_of(data_dir: Path | str, timeframe: str = "*", symbol: str = "*",
            period: str = "*") -> str:
    """The DuckDB glob (or, without ``*``, the path) of the files of ``timeframe`` /
    ``symbol`` / ``period`` (each ``*`` for all)."""
    return (f"{_root_text(data_dir)}/timeframe={timeframe}/symbol={symbol}/period={period}/"
            f"{FILE_NAME}")


def _manifest(data_dir: Path | str) -> SqliteManifest:
    return SqliteManifest(Path(data_dir) / MANIFEST_FILE)


def _file(root: Path, relative: str) -> Path:
    """A manifest path (relative to the data directory) as the listing would give it;
    ``root``: the resolved data directory (resolved once per answer, not per file)."""
    return root / relative


def _is_key(text: str) -> bool:
    """A string that can name a stored symbol or period: no separators, no glob
    characters, no ``..`` (anything else names no file, so it can be dropped)."""
    return (bool(re.fullmatch(STORAGE_KEY_PATTERN, text)) and ".." not in text)


def has_files(data_dir: Path | str, timeframe: str, symbol: str | None = None) -> bool:
    """Whether at least one file of ``timeframe`` (and ``symbol``) exists: one manifest
    query, else the directory walk stops at the first file found."""
    found = _manifest(data_dir).settled_files(
        timeframe, None if symbol is None else [symbol], limit=1)
    if found is not None:
        return bool(found)
    base = bars_root(data_dir) / f"timeframe={timeframe}"
    pattern = f"symbol={symbol or '*'}/period=*/{FILE_NAME}"
    return next(iter(base.glob(pattern)), None) is not None


def timeframe_sources(data_dir: Path | str, timeframe: str,
                      symbols: Iterable[str] | None = None,
                      periods: Iterable[str] | None = None) -> list[str]:
    """What DuckDB should read for the bars of ``timeframe``, narrowed to ``symbols`` and
    ``periods`` when given (None: all): a list of globs and paths, empty when nothing
    stored can match (the caller then defines an empty relation, since DuckDB refuses a
    glob that matches nothing).

    A symbol or period that cannot name a file (not a storage key) is dropped: a filter
    on it selects no stored bar anyway. With a settled manifest a narrowed answer is the
    partitions' file paths (no directory listed; DuckDB opens exactly those), and the
    whole timeframe is its glob when the manifest holds any of its files. Without, each
    glob is checked to match at least one file (one directory look-up each).
    """
    if timeframe not in TIMEFRAMES:
        raise ValueError(f"unknown timeframe {timeframe!r}; allowed: {', '.join(TIMEFRAMES)}")
    syms = sorted({s for s in symbols if _is_key(s)}) if symbols is not None else None
    pers = sorted({p for p in periods if _is_key(p)}) if periods is not None else None
    if syms == [] or pers == []:
        return []
    if syms is None and pers is None:
        return [glob_of(data_dir, timeframe)] if has_files(data_dir, timeframe) else []
    listed = _manifest(data_dir).settled_files(timeframe, syms, pers)
    if listed is not None:
        _root_text(data_dir)  # DuckDB reads a path as a glob too: refuse glob characters
        root = Path(data_dir).resolve()
        return [_file(root, rel).as_posix() for _, _, rel in listed]
    out = []
    base = bars_root(data_dir) / f"timeframe={timeframe}"
    for sym in syms if syms is not None else ["*"]:
        if sym != "*" and not (base / f"symbol={sym}").is_dir():
            continue
        for per in pers if pers is not None else ["*"]:
            if sym != "*" and per != "*":
                if not (base / f"symbol={sym}" / f"period={per}" / FILE_NAME).is_file():
                    continue
            elif next(iter(base.glob(f"symbol={sym}/period={per}/{FILE_NAME}")), None) is None:
                continue
            out.append(glob_of(data_dir, timeframe, sym, per))
    return out


def symbol_periods(data_dir: Path | str, timeframe: str, symbol: str) -> list[tuple[str, Path]]:
    """``(period, file)`` of every stored partition of ``symbol`` at ``timeframe``, in
    period order: the manifest's rows when it is settled, else one directory listing (the
    caller validates its arguments)."""
    listed = _manifest(data_dir).settled_files(timeframe, [symbol])
    if listed is not None:
        root = Path(data_dir).resolve()
        return [(period, _file(root, rel)) for _, period, rel in listed]
    base = bars_root(data_dir) / f"timeframe={timeframe}" / f"symbol={symbol}"
    try:
        entries = list(os.scandir(base))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for e in entries:
        if not e.name.startswith("period=") or not e.is_dir(follow_symlinks=False):
            continue
        path = Path(e.path) / FILE_NAME
        if path.is_file():
            out.append((e.name[len("period="):], path))
    return sorted(out)


def timeframe_files(data_dir: Path | str,
                    timeframe: str) -> dict[str, list[tuple[str, Path]]]:
    """Per stored symbol of ``timeframe`` (sorted), its :func:`symbol_periods`: one manifest
    query for the whole universe when it is settled (instead of a query per symbol), else a
    listing per symbol."""
    listed = _manifest(data_dir).settled_files(timeframe)
    if listed is None:
        return {sym: symbol_periods(data_dir, timeframe, sym)
                for sym in stored_symbols(data_dir, timeframe)}
    out: dict[str, list[tuple[str, Path]]] = {}
    root = Path(data_dir).resolve()
    for sym, period, rel in listed:
        out.setdefault(sym, []).append((period, _file(root, rel)))
    return out


def timeframe_file_rows(data_dir: Path | str,
                        timeframe: str) -> dict[str, list[tuple[str, str, int | None]]]:
    """:func:`timeframe_files` with each partition's row count, the file as a path string
    (a caller picking a few of 24,000 files need not build 24,000 ``Path`` objects): the
    manifest's rows when it is settled (one query), else None (the caller reads the
    file's footer)."""
    listed = _manifest(data_dir).settled_files(timeframe, rows=True)
    if listed is None:
        return {sym: [(period, str(path), None) for period, path in files]
                for sym, files in timeframe_files(data_dir, timeframe).items()}
    out: dict[str, list[tuple[str, str, int | None]]] = {}
    root = Path(data_dir).resolve().as_posix()
    for sym, period, rel, rows in listed:
        out.setdefault(sym, []).append((period, f"{root}/{rel}", rows))
    return out


def stored_symbols(data_dir: Path | str, timeframe: str) -> list[str]:
    """Symbols with at least one file at ``timeframe``: the manifest's when it is settled,
    else one listing of the timeframe's directory."""
    listed = _manifest(data_dir).settled_symbols(timeframe)
    if listed is not None:
        return listed
    base = bars_root(data_dir) / f"timeframe={timeframe}"
    try:
        entries = list(os.scandir(base))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e.name[len("symbol="):] for e in entries
                  if e.name.startswith("symbol=") and e.is_dir(follow_symlinks=False)
                  and next(iter(Path(e.path).glob(f"period=*/{FILE_NAME}")), None) is not None)
