"""DuckDB views over the Parquet bar store, and read-only SQL queries.

Views (identical in the catalog file and in :func:`query`'s in-memory database):

``bars``
    every stored bar: ``timeframe`` VARCHAR, ``symbol`` VARCHAR, ``ts`` TIMESTAMPTZ,
    ``open``/``high``/``low``/``close``/``volume``/``wap`` DOUBLE, ``bar_count`` BIGINT,
    ``period`` VARCHAR — one glob over ``bars/timeframe=*/symbol=*/period=*/data.parquet``
    with Hive partitioning, so files written later are seen without re-creating anything.
``bars_<tf>``
    one per timeframe that is stored or enabled (``KTRDR_TIMEFRAMES``): the same columns
    minus ``timeframe``, over a glob of that timeframe's directory only. A filter on
    ``symbol``/``period`` prunes whole files, so ``bars_1m WHERE symbol = 'AAPL'`` reads
    only AAPL's 1-minute files (and a ``ts`` range skips row groups by their statistics).
``coverage``
    per symbol and timeframe: ``first_bar``, ``last_bar``, ``rows``, ``partitions``
    (periods holding at least one bar). In :func:`query`'s database it is the store's
    partition manifest (:mod:`.manifest`, no Parquet file opened: milliseconds at any size);
    in the catalog file, which external tools open without the pipeline's code, it is a view
    aggregating ``bars`` (every file read).
``symbol_bars(timeframe, symbol)``
    a table macro: one symbol's bars of one timeframe, the columns of ``bars_<tf>``. It
    reads only ``timeframe=<tf>/symbol=<SYM>/``, whereas a filter on ``symbol`` over a view
    still lists and prunes every stored file of the timeframe (DuckDB cannot push the
    filter into its glob), a cost that grows with the universe: use it for one-symbol
    queries, e.g. ``SELECT ... FROM symbol_bars('1m', 'AAPL') WHERE ts >= ...``. Unknown
    timeframes and malformed symbols are refused with the allowed forms; a symbol with
    nothing stored at that timeframe is an error naming it.

A view whose glob would match no file is defined over an empty relation of the same types
instead (DuckDB refuses a glob matching nothing), so every view works on an empty store.
Files written later into a timeframe that already had files are seen at once; the first
file of a new timeframe needs :func:`refresh_catalog` for ``bars_<tf>`` (``bars`` sees it
at once unless the store was empty). :func:`query` builds its views per call, so it always
sees everything.

**Two ways in, and DuckDB's file lock.** A DuckDB file opened read-write by one process
cannot be opened by any other process at the same time, not even read-only. Therefore:

- ``data_dir/catalog.duckdb`` exists for external tools (DBeaver, a Python shell):
  :func:`refresh_catalog` opens it read-write only for the milliseconds it takes to
  ``CREATE OR REPLACE`` the views, and only when they changed (a new timeframe, the first
  file, a moved data directory); it retries while another process holds the file. Open it
  read-only (:func:`connect_readonly`, or DBeaver's read-only flag) so that the pipeline
  can still refresh it.
- :func:`query` (the ``sql`` command) never touches ``catalog.duckdb``: it creates the same
  views in an in-memory database directly over the Parquet files, so a query never waits
  for, nor blocks, a writer. If ``data_dir/greeks.duckdb`` exists it is attached
  read-only as ``greeks`` (``SELECT * FROM greeks.<table>``); when it is absent or locked
  by a writer it is silently skipped.

:func:`query` runs exactly one read-only statement — SELECT/WITH/FROM/VALUES, SHOW,
DESCRIBE, SUMMARIZE, EXPLAIN of those, and informational PRAGMAs (``table_info``,
``show_tables``, ...) — classified by DuckDB's own parser (:func:`duckdb.extract_statements`).
Everything else (INSERT, CREATE, COPY, ATTACH, SET, several statements) is refused with
:class:`QueryError`.

**Confined to the store.** A read-only statement can still name files: ``read_csv``,
``read_text``, ``glob``, ``read_parquet`` of any path or URL. After the views, the macro
and the Greeks attachment are in place, :func:`memory_connection` therefore turns DuckDB's
external access off (``enable_external_access = false``) except for the store's bar
directory (``allowed_directories = ['<data_dir>/bars/']``, which the views and
``symbol_bars`` glob at query time) and locks the configuration
(``lock_configuration = true``: no statement can turn it back on). The Greeks database,
attached before, stays readable; extensions cannot be installed or loaded. A query naming
anything else fails with a :class:`QueryError` saying that queries may read only the store.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import hashlib
import io
import json
import logging
import math
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from ..domain.symbols import STORAGE_KEY_PATTERN
from ..domain.timeframes import DEFAULT_TIMEFRAMES, TIMEFRAMES, Timeframe
from ..locking import is_duckdb_locked, retry_while_locked
from .parquet import BarStore

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.duckdb"
GREEKS_FILE = "greeks.duckdb"
GREEKS_ALIAS = "greeks"
FORMATS = ("table", "csv", "json")
LOCK_TIMEOUT_S = 10.0
_SIGNATURE_PREFIX = "ktrdr views "
#: The table macro reading one symbol of one timeframe (see the module docstring).
SYMBOL_BARS = "symbol_bars"

#: The ``bars`` view's columns and their DuckDB types, in order.
BARS_COLUMNS: list[tuple[str, str]] = [
    ("timeframe", "VARCHAR"), ("symbol", "VARCHAR"), ("ts", "TIMESTAMP WITH TIME ZONE"),
    ("open", "DOUBLE"), ("high", "DOUBLE"), ("low", "DOUBLE"), ("close", "DOUBLE"),
    ("volume", "DOUBLE"), ("wap", "DOUBLE"), ("bar_count", "BIGINT"), ("period", "VARCHAR"),
]
_READ_TYPES = {duckdb.StatementType.SELECT}
#: PRAGMAs that only report; everything else a PRAGMA can do (settings) is refused.
READ_PRAGMAS = frozenset({
    "table_info", "show", "show_tables", "show_tables_expanded", "show_databases",
    "database_list", "database_size", "storage_info", "version", "platform", "functions",
    "metadata_info", "user_agent", "collations",
})


class CatalogLockedError(RuntimeError):
    """The catalog file stayed locked by another process for too long."""


class QueryError(ValueError):
    """A statement :func:`query` refuses, or one DuckDB could not run."""


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[tuple]


# -- view definitions -----------------------------------------------------------------------
def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _bars_root(data_dir: Path) -> Path:
    return Path(data_dir).resolve() / "bars"


def _glob(data_dir: Path, timeframe: str = "*") -> str:
    root = _bars_root(data_dir).as_posix()
    if any(ch in root for ch in "*?[]{}"):
        raise ValueError(f"data directory {root!r} contains glob characters (*?[]{{}}); "
                         "DuckDB cannot read Parquet files below it — choose another path")
    return f"{root}/timeframe={timeframe}/symbol=*/period=*/data.parquet"


def _has_files(root: Path, pattern: str) -> bool:
    return next(iter(root.glob(pattern)), None) is not None


def stored_timeframes(data_dir: Path) -> list[str]:
    """Timeframes with at least one Parquet file, in registry order."""
    root = _bars_root(data_dir)
    return [name for name in TIMEFRAMES
            if _has_files(root / f"timeframe={name}", "symbol=*/period=*/data.parquet")]


def _read_parquet(glob: str, columns: Sequence[str]) -> str:
    return (f"SELECT {', '.join(columns)} FROM read_parquet({_sql_str(glob)}, "
            "hive_partitioning = true, hive_types = {'timeframe': VARCHAR, "
            "'symbol': VARCHAR, 'period': VARCHAR})")


def _empty(columns: Sequence[str]) -> str:
    types = dict(BARS_COLUMNS)
    typed = ", ".join(f"CAST(NULL AS {types[c]}) AS {c}" for c in columns)
    return f"SELECT {typed} WHERE false"


def view_statements(data_dir: Path,
                    timeframes: Iterable[str | Timeframe] | None = None, *,
                    coverage: bool = True) -> list[str]:
    """The ``CREATE OR REPLACE VIEW`` statements of the catalog, in order.

    ``bars`` globs every timeframe (so it also sees timeframes stored later);
    ``bars_<tf>`` globs only its timeframe's directory, which keeps its queries from
    listing other timeframes' files. A view whose glob would match nothing is an empty
    relation of the same types instead. ``timeframes`` get a ``bars_<tf>`` view even
    when nothing is stored for them (default:
    :data:`~ktrdr_pipeline.domain.timeframes.DEFAULT_TIMEFRAMES`; callers holding settings
    pass ``settings.timeframes``); stored timeframes always do. ``coverage`` adds the
    ``coverage`` view aggregating ``bars`` (the catalog file's; :func:`define_views` gives
    an in-memory database the manifest's instead).
    """
    wanted = [t.name if isinstance(t, Timeframe) else t
              for t in (timeframes if timeframes is not None else DEFAULT_TIMEFRAMES)]
    for name in wanted:
        if name not in TIMEFRAMES:
            raise ValueError(f"unknown timeframe {name!r}; allowed: {', '.join(TIMEFRAMES)}")
    stored = stored_timeframes(data_dir)
    names = [n for n in TIMEFRAMES if n in set(wanted) | set(stored)]
    cols = [c for c, _ in BARS_COLUMNS]
    source = _read_parquet(_glob(data_dir), cols) if stored else _empty(cols)
    statements = [f"CREATE OR REPLACE VIEW bars AS {source}"]
    per_tf = [c for c in cols if c != "timeframe"]
    for name in names:
        source = _read_parquet(_glob(data_dir, name), per_tf) if name in stored else _empty(
            per_tf)
        statements.append(f"CREATE OR REPLACE VIEW {_ident('bars_' + name)} AS {source}")
    if coverage:
        statements.append(
            "CREATE OR REPLACE VIEW coverage AS SELECT symbol, timeframe, min(ts) AS first_bar, "
            "max(ts) AS last_bar, count(*) AS \"rows\", count(DISTINCT period) AS partitions "
            "FROM bars GROUP BY symbol, timeframe")
    return statements


def macro_statements(data_dir: Path) -> list[str]:
    """The ``CREATE OR REPLACE MACRO`` statements of the catalog: ``symbol_bars``.

    Its arguments are checked before they become a path: the timeframe against the
    registry, the symbol against the storage-key shape (no separators, no ``..``), each
    failure raised by DuckDB's ``error()`` with what is allowed.
    """
    prefix = _glob(data_dir).split("/timeframe=", 1)[0] + "/timeframe="
    allowed = ", ".join(TIMEFRAMES)
    names = ", ".join(_sql_str(n) for n in TIMEFRAMES)
    per_tf = ", ".join(c for c, _ in BARS_COLUMNS if c != "timeframe")
    # the parameters must not be named like columns: a macro substitutes them everywhere
    return [
        f"CREATE OR REPLACE MACRO {SYMBOL_BARS}(tf_name, symbol_key) AS TABLE "
        f"SELECT {per_tf} FROM read_parquet(CASE "
        f"WHEN coalesce(tf_name NOT IN ({names}), true) THEN error("
        f"'{SYMBOL_BARS}: unknown timeframe ' || coalesce('''' || tf_name || '''', 'NULL') "
        f"|| '; allowed: {allowed}') "
        f"WHEN coalesce(NOT regexp_full_match(symbol_key, {_sql_str(STORAGE_KEY_PATTERN)}) "
        f"OR contains(symbol_key, '..'), true) THEN error("
        f"'{SYMBOL_BARS}: invalid symbol ' || coalesce('''' || symbol_key || '''', 'NULL') "
        f"|| '; expected a storage key as in the symbol column: upper-case letters, digits, "
        f"''.'', ''-'', ''_'' (e.g. ''AAPL'', ''EURUSD'')') "
        f"ELSE {_sql_str(prefix)} || tf_name || '/symbol=' || symbol_key || "
        f"'/period=*/data.parquet' END, hive_partitioning = true, hive_types = "
        "{'timeframe': VARCHAR, 'symbol': VARCHAR, 'period': VARCHAR})"
    ]


def define_views(con: duckdb.DuckDBPyConnection, data_dir: Path,
                 timeframes: Iterable[str | Timeframe] | None = None) -> list[str]:
    """Create (or replace) the views and macros on ``con`` (an in-memory database);
    returns the view names. ``bars_*`` views of timeframes no longer wanted are dropped;
    ``coverage`` comes from the manifest (:func:`define_coverage`)."""
    names = _apply(con, view_statements(data_dir, timeframes, coverage=False),
                   macro_statements(data_dir))
    define_coverage(con, data_dir)
    return [*names, "coverage"]


#: The ``coverage`` relation's columns and their Arrow types (DuckDB: VARCHAR,
#: TIMESTAMP WITH TIME ZONE, BIGINT), as the catalog file's view has them.
COVERAGE_COLUMNS = [("symbol", "string"), ("timeframe", "string"),
                    ("first_bar", "timestamp[us, tz=UTC]"), ("last_bar", "timestamp[us, tz=UTC]"),
                    ("rows", "int64"), ("partitions", "int64")]


def coverage_table(data_dir: Path | str) -> Any:
    """Per symbol and timeframe: ``first_bar``, ``last_bar``, ``rows`` and ``partitions``
    (periods holding at least one bar), from the store's manifest as a ``pyarrow.Table``:
    no Parquet file is opened (an absent store has none)."""
    import pyarrow as pa

    from .contents import read_coverage

    types = {"string": pa.string(), "int64": pa.int64(),
             "timestamp[us, tz=UTC]": pa.timestamp("us", tz="UTC")}
    schema = pa.schema([(name, types[t]) for name, t in COVERAGE_COLUMNS])
    rows = read_coverage(data_dir)
    columns = list(zip(*[(r.symbol, r.timeframe, r.first_bar, r.last_bar, r.rows,
                          r.partitions) for r in rows], strict=True)) or [()] * 6
    return pa.Table.from_arrays([pa.array(list(c), type=f.type)
                                 for c, f in zip(columns, schema, strict=True)], schema=schema)


def define_coverage(con: duckdb.DuckDBPyConnection, data_dir: Path | str) -> None:
    """``coverage`` on ``con``: the manifest's :func:`coverage_table`, registered as a
    relation (read when this is called; an in-memory connection lives for one query)."""
    con.register("coverage", coverage_table(data_dir))


def _view_names(statements: Sequence[str]) -> list[str]:
    names = []
    for st in statements:
        head = st.split(" AS ", 1)[0]
        names.append(head.rsplit(" ", 1)[1].strip('"'))
    return names


def _apply(con: duckdb.DuckDBPyConnection, statements: Sequence[str],
           macros: Sequence[str] = ()) -> list[str]:
    names = _view_names(statements)
    existing = [r[0] for r in con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal AND schema_name = 'main' "
        "AND database_name = current_database()").fetchall()]
    for old in existing:
        if old.startswith("bars_") and old not in names:
            con.execute(f"DROP VIEW IF EXISTS {_ident(old)}")
    for st in [*statements, *macros]:
        con.execute(st)
    return names


def _signature(statements: Sequence[str]) -> str:
    digest = hashlib.sha256("\n".join([duckdb.__version__, *statements]).encode()).hexdigest()
    return _SIGNATURE_PREFIX + digest[:24]


# -- the catalog file -----------------------------------------------------------------------
def catalog_path(data_dir: Path) -> Path:
    return Path(data_dir) / CATALOG_FILE


def _connect(path: Path, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
    """Open ``path``, retrying with backoff while another process holds its lock."""
    try:
        return retry_while_locked(
            lambda: duckdb.connect(str(path), read_only=read_only), deadline_s=timeout_s,
            is_locked=is_duckdb_locked, max_delay_s=0.5,
            on_retry=lambda _exc, delay: log.debug("catalog %s locked; retrying in %.2f s",
                                                   path, delay))
    except duckdb.IOException as exc:
        if not is_duckdb_locked(exc):
            raise
        raise CatalogLockedError(
            f"DuckDB catalog {path} is locked by another process (gave up after "
            f"{timeout_s:g} s): {exc}. A DuckDB file opened read-write elsewhere "
            "(DBeaver, a Python shell) blocks everyone else: close it or open it "
            "read-only. Queries via the 'sql' command do not need this file."
        ) from exc


def _stored_signature(path: Path) -> str | None:
    """The signature of the views in the catalog file; None when unknown (absent,
    locked, unreadable) — the caller then rewrites."""
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error:
        return None
    try:
        row = con.execute("SELECT comment FROM duckdb_views() WHERE view_name = 'bars' "
                          "AND NOT internal").fetchone()
        return row[0] if row else None
    except duckdb.Error:
        return None
    finally:
        con.close()


def refresh_catalog(data_dir: Path | str, *,
                    timeframes: Iterable[str | Timeframe] | None = None,
                    force: bool = False, timeout_s: float = LOCK_TIMEOUT_S) -> bool:
    """Bring ``data_dir/catalog.duckdb``'s views up to date; True when it was rewritten.

    Cheap to call after every write: when the views are unchanged (same timeframes, same
    empty/non-empty state, same location) it only peeks at the file read-only. Otherwise
    it holds the write lock for a few milliseconds, retrying with backoff for up to
    ``timeout_s`` if another process holds the file, then raises
    :class:`CatalogLockedError` naming the file.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = catalog_path(data_dir)
    statements = view_statements(data_dir, timeframes)
    macros = macro_statements(data_dir)
    signature = _signature([*statements, *macros])
    if not force and path.exists() and _stored_signature(path) == signature:
        return False
    con = _connect(path, read_only=False, timeout_s=timeout_s)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            _apply(con, statements, macros)
            con.execute(f"COMMENT ON VIEW bars IS {_sql_str(signature)}")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()
    log.info("catalog %s refreshed (%d views)", path, len(statements))
    return True


def connect_readonly(data_dir: Path | str, *, refresh: bool = True,
                     timeout_s: float = LOCK_TIMEOUT_S) -> duckdb.DuckDBPyConnection:
    """A read-only connection to ``catalog.duckdb`` (session time zone UTC), refreshing
    the views first when they are out of date. Close it when done: while it is open,
    :func:`refresh_catalog` in another process waits."""
    data_dir = Path(data_dir)
    path = catalog_path(data_dir)
    if refresh or not path.exists():
        refresh_catalog(data_dir, timeout_s=timeout_s)
    con = _connect(path, read_only=True, timeout_s=timeout_s)
    con.execute("SET TimeZone = 'UTC'")
    return con


# -- read-only queries ----------------------------------------------------------------------
def _tokens(sql: str) -> list[str]:
    """The statement's tokens as text, comments dropped (DuckDB's own tokenizer)."""
    raw = duckdb.tokenize(sql)
    out = []
    for k, (offset, kind) in enumerate(raw):
        end = raw[k + 1][0] if k + 1 < len(raw) else len(sql)
        if kind == duckdb.token_type.comment:
            continue
        out.append((offset, sql[offset:end].strip()))
    return out


def _explained(sql: str) -> str:
    """The statement an EXPLAIN [ANALYZE] [(options)] statement explains."""
    toks = _tokens(sql)
    k = 1  # after EXPLAIN
    if k < len(toks) and toks[k][1].upper() == "ANALYZE":
        k += 1
    if k < len(toks) and toks[k][1] == "(":
        depth = 0
        while k < len(toks):
            if toks[k][1] == "(":
                depth += 1
            elif toks[k][1] == ")":
                depth -= 1
                if depth == 0:
                    k += 1
                    break
            k += 1
    return sql[toks[k][0]:] if k < len(toks) else ""


def check_read_only(sql: str) -> str:
    """The single read-only statement in ``sql``; :class:`QueryError` otherwise."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"cannot parse SQL: {exc}") from None
    if len(statements) != 1:
        raise QueryError(f"exactly one SQL statement is allowed, got {len(statements)}")
    st = statements[0]
    kind = st.type
    if kind in _READ_TYPES:
        return st.query
    if kind == duckdb.StatementType.EXPLAIN:
        inner = _explained(st.query)
        try:
            inner_st = duckdb.extract_statements(inner) if inner.strip() else []
        except duckdb.Error:
            inner_st = []
        if len(inner_st) == 1 and inner_st[0].type in _READ_TYPES:
            return st.query
        raise QueryError("EXPLAIN is allowed only for read-only queries (SELECT ...)")
    if kind == duckdb.StatementType.PRAGMA:
        toks = _tokens(st.query)
        name = toks[1][1].lower() if len(toks) > 1 else ""
        if name in READ_PRAGMAS:
            return st.query
        raise QueryError(f"PRAGMA {name} is not allowed; read-only PRAGMAs: "
                         f"{', '.join(sorted(READ_PRAGMAS))}")
    if kind == duckdb.StatementType.SET:
        raise QueryError("SET and RESET are not allowed: queries run read-only with DuckDB's "
                         "settings locked, and may read only the store (its bar files and "
                         "the attached Greeks database)")
    raise QueryError(
        f"only read-only statements are allowed (SELECT, WITH, FROM, VALUES, SHOW, DESCRIBE, "
        f"SUMMARIZE, EXPLAIN, PRAGMA table_info); got {kind.name}")


def memory_connection(data_dir: Path | str,
                      timeframes: Iterable[str | Timeframe] | None = None,
                      *, confined: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the catalog's views over the Parquet files (no file lock)
    and ``greeks.duckdb`` attached read-only as ``greeks`` when available; ``confined``
    (the default) leaves it able to read only those (see the module docstring)."""
    data_dir = Path(data_dir)
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False})
    try:
        # after connecting: as a connect option it is applied before ICU is loaded
        con.execute("SET TimeZone = 'UTC'")
        # an interactive session queries the same files again and again: keep their
        # Parquet footers in memory (DuckDB re-validates them against the files)
        con.execute("SET parquet_metadata_cache = true")
        define_views(con, data_dir, timeframes)
        greeks = data_dir / GREEKS_FILE
        if greeks.is_file():
            def attach() -> None:
                con.execute(f"ATTACH {_sql_str(str(greeks.resolve()))} AS "
                            f"{GREEKS_ALIAS} (READ_ONLY)")
                # its tables are reachable unqualified too: FROM portfolio_greeks
                con.execute(f"SET search_path = 'memory.main,{GREEKS_ALIAS}.main'")

            # the Greeks writer holds the file for a few milliseconds every few seconds:
            # try for about a second (every 0.1 s) before giving up on it
            try:
                retry_while_locked(attach, deadline_s=0.95, is_locked=is_duckdb_locked,
                                   first_delay_s=0.1, max_delay_s=0.1)
            except duckdb.Error as exc:  # locked by its writer, or not a DuckDB file
                log.info("not attaching %s: %s", greeks, exc)
        if confined:
            confine(con, data_dir)
    except BaseException:
        con.close()
        raise
    return con


def confine(con: duckdb.DuckDBPyConnection, data_dir: Path | str) -> None:
    """Let ``con`` read no file but the store's bars from now on (databases attached
    before stay readable), and lock its configuration so no statement can undo it."""
    root = _bars_root(Path(data_dir)).as_posix() + "/"
    con.execute(f"SET allowed_directories = [{_sql_str(root)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _outside_the_store(text: str, data_dir: Path) -> QueryError:
    return QueryError(
        f"queries may read only the store: the bar files under {_bars_root(data_dir)} "
        f"(through the views bars, bars_<tf>, coverage and {SYMBOL_BARS}()) and the attached "
        f"Greeks database; DuckDB refused: {' '.join(text.split())}")


#: DuckDB's error for a ``symbol_bars`` call whose symbol has no file at that timeframe.
_NOTHING_STORED = re.compile(r'No files found that match the pattern "[^"]*/timeframe='
                             r'([^/"]+)/symbol=([^/"]+)/period=\*/data\.parquet"')


def _query_error(exc: duckdb.Error, data_dir: Path) -> QueryError:
    """DuckDB's error, with what is stored when ``symbol_bars`` found nothing."""
    text = str(exc)
    if isinstance(exc, duckdb.PermissionException) or "configuration has been locked" in text:
        return _outside_the_store(text, data_dir)
    found = _NOTHING_STORED.search(text)
    if found:
        tf, symbol = found.groups()
        stored = BarStore(data_dir).symbols(tf)
        return QueryError(
            f"{SYMBOL_BARS}: no {tf} bars stored for symbol {symbol!r}; symbols with {tf} "
            f"bars: {', '.join(stored) if stored else 'none'} (see the coverage view)")
    return QueryError(text)


def run_query(data_dir: Path | str, sql: str,
              timeframes: Iterable[str | Timeframe] | None = None) -> QueryResult:
    """Run one read-only statement over the store; see the module docstring."""
    statement = check_read_only(sql)
    con = memory_connection(data_dir, timeframes)
    try:
        cur = con.execute(statement)
        description = cur.description or []
        rows = cur.fetchall() if description else []
    except duckdb.Error as exc:
        raise _query_error(exc, Path(data_dir)) from exc
    finally:
        con.close()
    return QueryResult([d[0] for d in description], [str(d[1]) for d in description], rows)


def query(data_dir: Path | str, sql: str, fmt: str = "table",
          timeframes: Iterable[str | Timeframe] | None = None) -> str:
    """Run one read-only statement and format the result (``table``, ``csv``, ``json``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    result = run_query(data_dir, sql, timeframes)
    return format_result(result.rows, result.columns, fmt)


# -- output formats -------------------------------------------------------------------------
def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return str(value)


def _text(value: Any, sep: str = "T") -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return repr(value)
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=sep)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, dict | list | tuple):
        return json.dumps(_json_value(value))
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | decimal.Decimal) and not isinstance(value, bool)


def format_result(rows: Sequence[Sequence[Any]], columns: Sequence[str], fmt: str) -> str:
    """Rows as ``table`` (aligned text like psql), ``csv`` (RFC 4180 quoting with a header,
    ``\\n`` line ends so that shell pipelines see clean lines) or ``json`` (an array of
    objects; ISO 8601 times, NaN as null)."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_text(v) for v in row])
        return buf.getvalue()
    if fmt == "json":
        records = [{c: _json_value(v) for c, v in zip(columns, row, strict=True)}
                   for row in rows]
        if not records:
            return "[]\n"
        return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    # a cell may span several lines (EXPLAIN plans); each line is aligned on its own
    cells = [[_text(v, sep=" ").split("\n") for v in row] for row in rows]
    numeric = [bool(rows) and all(_is_number(r[i]) or r[i] is None for r in rows)
               for i in range(len(columns))]
    widths = [max([len(c), *(len(line) for r in cells for line in r[i])])
              for i, c in enumerate(columns)]
    lines = [" " + " | ".join(c.center(w) for c, w in zip(columns, widths, strict=True)),
             "-" + "-+-".join("-" * w for w in widths) + "-"]
    for r in cells:
        for k in range(max((len(c) for c in r), default=1)):
            parts = [c[k] if k < len(c) else "" for c in r]
            lines.append(" " + " | ".join(
                (v.rjust(w) if num else v.ljust(w))
                for v, w, num in zip(parts, widths, numeric, strict=True)).rstrip())
    lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(lines) + "\n"
