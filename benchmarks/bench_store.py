"""Bar store benchmark: Parquet + DuckDB against the original one-CSV-per-series design.

Data: 1-minute RTH TRADES bars of 20 stocks over two calendar years (2024-2025, about 500
NYSE sessions, ~3.8 M rows), generated with the simulator's :class:`MarketModel` session by
session (the default universe's seven stocks, the thin ILLQ among them, plus synthetic ones
made with ``dataclasses.replace``). Both contenders hold the same frames:

- **CSV** (the original design): one file per symbol and timeframe,
  ``<SYMBOL>_1m.csv``, columns ts,open,high,low,close,volume,wap,bar_count, as written by
  ``DataFrame.to_csv``; queried with ``pandas.read_csv`` (+ ``resample``).
- **Store**: :class:`ktrdr_pipeline.store.parquet.BarStore` (monthly partitions), queried
  with SQL on an open DuckDB connection
  (:func:`ktrdr_pipeline.store.catalog.memory_connection`, the views defined once, as in a
  notebook or DBeaver session; every query still reads the Parquet files). One-symbol
  queries go through the catalog's ``symbol_bars('1m', 'AAPL')`` table macro, which lists
  only that symbol's files; the same query over the ``bars_1m`` view (which lists all 480
  files of the timeframe before pruning them) is measured next to it. The ``sql``
  command's end-to-end time (:func:`~ktrdr_pipeline.store.catalog.run_query`: a new
  in-memory DuckDB and its views on every call) is reported too.

Measured side by side in one run (the machine is shared and noisy):

1. bytes on disk (all CSV files vs all ``data.parquet`` files). Target: <= 30 %.
2. daily OHLCV of one symbol-year (AAPL, 2025 in exchange time): DuckDB ``GROUP BY`` day
   over ``symbol_bars`` (and over ``bars_1m``) vs ``read_csv`` + ``resample('1D')``.
   Target: >= 10x faster.
3. cross-symbol filter: every bar of every symbol in June 2025 with volume above the
   99th percentile: DuckDB over ``bars_1m`` with a ``ts`` range vs reading every CSV.
   Target: >= 10x faster.

Each query runs ``--reps`` times (default 5) after one untimed warm-up, alternating
the contenders; the figure is the ratio of the medians (the target is judged on the
documented query on an open connection: ``symbol_bars`` for the daily query, the
``bars_1m`` view for the cross-symbol one), and all contenders must return the same
answer. Results go to
``benchmarks/results/store_vs_csv.{json,md}``. Run ``python -m benchmarks.bench_store``
from the repository root (or the file by path); it takes about a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow  # noqa: E402

from ktrdr_pipeline.domain import calendars  # noqa: E402
from ktrdr_pipeline.domain.timeframes import PARTITION_TZ  # noqa: E402
from ktrdr_pipeline.simulator.market import C, H, L, MarketModel, N, O, T, V, W  # noqa: E402
from ktrdr_pipeline.simulator.universe import Instrument, build_universe, stable_id  # noqa: E402
from ktrdr_pipeline.store.catalog import memory_connection, run_query  # noqa: E402
from ktrdr_pipeline.store.parquet import BarStore  # noqa: E402

log = logging.getLogger("benchmarks.bench_store")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FIRST_DAY, LAST_DAY = date(2024, 1, 1), date(2025, 12, 31)
QUERY_SYMBOL, QUERY_YEAR, QUERY_MONTH = "AAPL", 2025, "2025-06"
TARGET_BYTES_RATIO = 0.30
TARGET_SPEEDUP = 10.0
SEED = 20240101


# -- data --------------------------------------------------------------------------------------
def instruments(count: int) -> list[Instrument]:
    """The default universe's stocks, then synthetic ones, ``count`` in all."""
    stocks = sorted(
        (i for i in build_universe(LAST_DAY).instruments.values() if i.sec_type == "STK"),
        key=lambda i: i.symbol,
    )
    rng = np.random.default_rng(SEED)
    out = stocks[:count]
    k = 0
    while len(out) < count:
        base = stocks[k % len(stocks)]
        symbol = f"SYN{k:02d}"
        out.append(
            dataclasses.replace(
                base,
                con_id=stable_id("BENCH", symbol),
                symbol=symbol,
                local_symbol=symbol,
                trading_class=symbol,
                long_name=f"SYNTHETIC {k}",
                base_price=float(np.round(rng.uniform(20, 500), 2)),
                annual_vol=float(rng.uniform(0.15, 0.6)),
                volume_per_minute=float(rng.uniform(5_000, 200_000)),
            )
        )
        k += 1
    return out


def minute_frame(model: MarketModel, inst: Instrument) -> pd.DataFrame:
    """RTH 1-minute TRADES bars of ``inst`` over [FIRST_DAY, LAST_DAY], one session at a
    time."""
    sch = calendars.schedule(inst.profile.name)
    i = int(np.searchsorted(sch.dates, np.datetime64(FIRST_DAY, "D"), side="left"))
    j = int(np.searchsorted(sch.dates, np.datetime64(LAST_DAY, "D"), side="right"))
    blocks = []
    for idx in range(i, j):
        block = model.session_minutes(inst, idx)
        keep = (block[:, T] >= sch.rth_open[idx]) & (block[:, T] < sch.rth_close[idx])
        keep &= block[:, V] > 0  # TRADES bars: a minute without a trade has none
        blocks.append(block[keep])
    b = np.concatenate(blocks)
    index = pd.DatetimeIndex(
        pd.to_datetime(b[:, T].astype(np.int64), unit="s", utc=True), name="ts"
    ).as_unit("ns")
    return pd.DataFrame(
        {
            "open": b[:, O],
            "high": b[:, H],
            "low": b[:, L],
            "close": b[:, C],
            "volume": b[:, V],
            "wap": b[:, W],
            "bar_count": b[:, N].astype(np.int64),
        },
        index=index,
    )


def write_store(store: BarStore, symbol: str, frame: pd.DataFrame) -> int:
    local = frame.index.tz_convert(PARTITION_TZ)
    month = (local.year * 100 + local.month).to_numpy()
    cuts = np.flatnonzero(np.r_[True, month[1:] != month[:-1], True])
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        key = f"{month[a] // 100:04d}-{month[a] % 100:02d}"
        store.write(
            "1m",
            symbol,
            key,
            frame.iloc[a:b],
            use_rth=True,
            what_to_show="TRADES",
            extra_meta={"source": "bench_store"},
        )
    return len(cuts) - 1


def tree_bytes(root: Path, pattern: str) -> tuple[int, int]:
    files = [p for p in root.rglob(pattern) if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


# -- the queries ---------------------------------------------------------------------------
def year_bounds_utc(year: int) -> tuple[str, str]:
    lo = pd.Timestamp(f"{year}-01-01", tz=PARTITION_TZ).tz_convert(UTC)
    hi = pd.Timestamp(f"{year + 1}-01-01", tz=PARTITION_TZ).tz_convert(UTC)
    return lo.isoformat(), hi.isoformat()


def month_bounds_utc(month: str) -> tuple[str, str]:
    lo = pd.Timestamp(f"{month}-01", tz=PARTITION_TZ)
    hi = lo + pd.offsets.MonthBegin(1)
    return lo.tz_convert(UTC).isoformat(), hi.tz_convert(UTC).isoformat()


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, index_col="ts", parse_dates=["ts"])


def daily_sql(over_view: bool = False) -> str:
    """The daily query over ``symbol_bars`` (default) or over the ``bars_1m`` view."""
    lo, hi = year_bounds_utc(QUERY_YEAR)
    source = (f"bars_1m WHERE symbol = '{QUERY_SYMBOL}' AND" if over_view
              else f"symbol_bars('1m', '{QUERY_SYMBOL}') WHERE")
    return f"""
        SELECT CAST(timezone('{PARTITION_TZ}', ts) AS DATE) AS day,
               arg_min(open, ts) AS open, max(high) AS high, min(low) AS low,
               arg_max(close, ts) AS close, sum(volume) AS volume
        FROM {source} ts >= '{lo}' AND ts < '{hi}'
        GROUP BY day ORDER BY day"""


def filter_sql(threshold: float) -> str:
    lo, hi = month_bounds_utc(QUERY_MONTH)
    return f"""
        SELECT symbol, ts, close, volume FROM bars_1m
        WHERE ts >= '{lo}' AND ts < '{hi}' AND volume > {threshold!r}
        ORDER BY symbol, ts"""


def on_connection(con: duckdb.DuckDBPyConnection, sql: str) -> pd.DataFrame:
    """The query on an open connection (views already defined)."""
    cur = con.execute(sql)
    return pd.DataFrame(cur.fetchall(), columns=[d[0] for d in cur.description])


def end_to_end(data_dir: Path, sql: str) -> pd.DataFrame:
    """What the ``sql`` command does: in-memory DuckDB, views, the query."""
    res = run_query(data_dir, sql)
    return pd.DataFrame(res.rows, columns=res.columns)


def daily_pandas(csv_dir: Path) -> pd.DataFrame:
    df = read_csv(csv_dir / f"{QUERY_SYMBOL}_1m.csv")
    lo, hi = year_bounds_utc(QUERY_YEAR)
    df = df[(df.index >= lo) & (df.index < hi)].tz_convert(PARTITION_TZ)
    out = (
        df.resample("1D")
        .agg({"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"})
        .dropna(subset=["open"])
    )
    out.index = out.index.date
    out.index.name = "day"
    return out


def filter_pandas(csv_dir: Path, symbols: list[str], threshold: float) -> pd.DataFrame:
    lo, hi = month_bounds_utc(QUERY_MONTH)
    parts = []
    for sym in symbols:
        df = read_csv(csv_dir / f"{sym}_1m.csv")
        df = df[(df.index >= lo) & (df.index < hi) & (df["volume"] > threshold)]
        parts.append(
            pd.DataFrame(
                {
                    "symbol": sym,
                    "ts": df.index,
                    "close": df["close"].to_numpy(),
                    "volume": df["volume"].to_numpy(),
                }
            )
        )
    return pd.concat(parts, ignore_index=True).sort_values(["symbol", "ts"], ignore_index=True)


def alternate(reps: int, contenders: dict[str, Callable[[], Any]],
              ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run the contenders one after the other, ``reps`` rounds; times and last results.
    One untimed warm-up run each first (first-use costs: ICU, pandas' resample code)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    results: dict[str, Any] = {name: fn() for name, fn in contenders.items()}
    for _ in range(reps):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return times, results


def check_daily(a: pd.DataFrame, b: pd.DataFrame) -> None:
    if list(a.index) != list(b.index):
        raise AssertionError(f"daily results differ in days: {len(a)} vs {len(b)}")
    for col in ("open", "high", "low", "close", "volume"):
        if not np.allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-12):
            raise AssertionError(f"daily results differ in {col}")


def check_filter(a: pd.DataFrame, b: pd.DataFrame) -> None:
    if len(a) != len(b) or list(a["symbol"]) != list(b["symbol"]):
        raise AssertionError(f"filter results differ: {len(a)} vs {len(b)} rows")
    ta = pd.DatetimeIndex(pd.to_datetime(a["ts"], utc=True)).as_unit("ns").asi8
    tb = pd.DatetimeIndex(pd.to_datetime(b["ts"], utc=True)).as_unit("ns").asi8
    if not np.array_equal(ta, tb) or not np.allclose(a["close"], b["close"]):
        raise AssertionError("filter results differ in ts or close")


def diagnose(con: duckdb.DuckDBPyConnection, data_dir: Path, daily: str,
             reps: int) -> dict[str, float]:
    """Where the daily query's time goes (medians, ms): listing the view's files; reading
    the six columns it needs from AAPL's 2025 files with no aggregation at all; and the
    same aggregation over the same rows already in memory (no file access at all)."""
    glob = f"{data_dir.resolve().as_posix()}/bars/timeframe=1m/symbol=*/period=*/data.parquet"
    lo, hi = year_bounds_utc(QUERY_YEAR)
    con.execute(f"CREATE OR REPLACE TEMP TABLE diag AS SELECT * FROM bars_1m WHERE symbol = "
                f"'{QUERY_SYMBOL}' AND ts >= '{lo}' AND ts < '{hi}'")
    in_memory = daily.replace(f"symbol_bars('1m', '{QUERY_SYMBOL}')", "diag")
    assert "FROM diag" in in_memory, in_memory
    utc_days = in_memory.replace(f"CAST(timezone('{PARTITION_TZ}', ts) AS DATE)",
                                 "CAST(epoch(ts)::BIGINT // 86400 AS BIGINT)")

    def median_ms(sql: str) -> float:
        runs = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            con.execute(sql).fetchall()
            runs.append(time.perf_counter() - t0)
        return round(statistics.median(runs[1:]) * 1000, 2)

    read_only = (f"SELECT max(ts), max(open), max(high), min(low), max(close), max(volume) "
                 f"FROM symbol_bars('1m', '{QUERY_SYMBOL}') WHERE ts >= '{lo}' AND ts < '{hi}'")
    out = {"list_files_ms": median_ms(f"SELECT count(*) FROM glob('{glob}')"),
           "read_columns_ms": median_ms(read_only),
           "aggregate_in_memory_ms": median_ms(in_memory),
           "aggregate_in_memory_utc_days_ms": median_ms(utc_days)}
    con.execute("DROP TABLE diag")
    return out


# -- report -------------------------------------------------------------------------------
def summary(times: dict[str, list[float]]) -> dict[str, Any]:
    """Medians and speedups against pandas; the target is judged on ``duckdb`` (the
    documented query on an open connection)."""
    med = {name: statistics.median(t) for name, t in times.items()}
    csv_s = med["csv"]
    out: dict[str, Any] = {f"{name}_s": [round(t, 4) for t in ts] for name, ts in times.items()}
    out.update({f"{name}_median_s": round(m, 4) for name, m in med.items()})
    out["speedup"] = round(csv_s / med["duckdb"], 1)
    for name in med:
        if name not in ("csv", "duckdb"):
            out[f"speedup_{name}"] = round(csv_s / med[name], 1)
    out["target_speedup"] = TARGET_SPEEDUP
    out["met"] = csv_s / med["duckdb"] >= TARGET_SPEEDUP
    return out


def markdown(res: dict[str, Any]) -> str:
    b, d, diag = res["bytes"], res["data"], res["daily_resample_diagnostics"]
    q1 = res["daily_resample"]
    queries = [(f"daily OHLCV of {QUERY_SYMBOL} {QUERY_YEAR}", res["daily_resample"]),
               (f"bars with volume > p99, all symbols, {QUERY_MONTH}",
                res["cross_symbol_filter"])]

    def ok(flag: bool) -> str:
        return "met" if flag else "**not met**"

    lines = [
        "# Bar store vs CSV",
        "",
        f"{res['date']}, {res['cores']} cores, Python {res['python']}, DuckDB "
        f"{res['duckdb']}, pandas {res['pandas']}, pyarrow {res['pyarrow']}. "
        f"Produced by `python -m benchmarks.bench_store`.",
        "",
        f"Data: {d['symbols']} symbols x {d['sessions']} RTH sessions "
        f"({d['first_day']}..{d['last_day']}) of 1-minute bars = {d['rows']:,} rows; "
        f"{d['store_files']} Parquet files (monthly partitions) vs {d['csv_files']} CSV files. "
        f"Generation {d['generate_s']} s, CSV write {d['csv_write_s']} s, store write "
        f"{d['store_write_s']} s.",
        "",
        "| measure | target | CSV + pandas | Parquet + DuckDB | measured | result |",
        "|---|---|---|---|---|---|",
        f"| bytes on disk | <= {TARGET_BYTES_RATIO:.0%} of CSV | {b['csv_bytes']:,} | "
        f"{b['store_bytes']:,} | {b['ratio']:.1%} | {ok(b['met'])} |",
    ]
    for label, q in queries:
        lines.append(
            f"| {label} (median of {res['reps']}) | >= {TARGET_SPEEDUP:g}x faster | "
            f"{q['csv_median_s'] * 1000:.1f} ms | {q['duckdb_median_s'] * 1000:.1f} ms | "
            f"{q['speedup']}x | {ok(q['met'])} |")
    lines += [
        "",
        "Query times: *Parquet + DuckDB* is the SQL query on an open connection (the views "
        "defined once, as in a notebook or DBeaver session; every query still reads the "
        "Parquet files): the daily query over `symbol_bars('1m', 'AAPL')`, which lists only "
        "AAPL's files, the cross-symbol query over the `bars_1m` view; *CSV + pandas* is "
        "`read_csv` of the needed file(s) plus the pandas work. The same daily query over the "
        f"`bars_1m` view (`WHERE symbol = 'AAPL'`), which lists all {d['store_files']} files "
        f"of the timeframe before pruning them, takes {q1['view_median_s'] * 1000:.1f} ms "
        f"({q1['speedup_view']}x). The `sql` command additionally opens an in-memory DuckDB "
        "and defines the views on every call; end to end it takes "
        + " and ".join(f"{q['sql_command_median_s'] * 1000:.1f} ms "
                       f"({q['speedup_sql_command']}x)" for _, q in queries)
        + " for the two queries.",
        "",
        f"About the daily query: pandas reads one {d['query_csv_bytes'] / 1e6:.0f} MB CSV and "
        f"resamples it in {q1['csv_median_s'] * 1000:.0f} ms on this machine, so 10x would "
        f"mean {q1['csv_median_s'] * 100:.1f} ms for DuckDB. Measured in this run: reading the "
        "six columns the query needs from AAPL's 2025 files, with no aggregation at all, takes "
        f"{diag['read_columns_ms']} ms; the aggregation alone, over the same rows already in "
        f"memory, {diag['aggregate_in_memory_ms']} ms ({diag['aggregate_in_memory_utc_days_ms']}"
        " ms when days are cut in UTC instead of converting every timestamp to exchange time "
        f"with ICU); listing the view's {d['store_files']} files {diag['list_files_ms']} ms "
        "(which `symbol_bars` avoids). The cross-symbol query, which pandas can only answer by "
        "reading every file, shows the other side.",
        "",
        f"Daily query: {res['daily_resample']['rows']} days; filter query: "
        f"{res['cross_symbol_filter']['rows']} bars (volume > "
        f"{res['cross_symbol_filter']['threshold']:g}). All contenders returned identical "
        "answers. Runs alternate (DuckDB, [view,] `sql` command, pandas) x reps; every run is "
        "in "
        "`store_vs_csv.json`.",
        "",
    ]
    return "\n".join(lines)


def run(work: Path, n_symbols: int, reps: int) -> dict[str, Any]:
    csv_dir, data_dir = work / "csv", work / "data"
    csv_dir.mkdir(parents=True, exist_ok=True)
    store = BarStore(data_dir)
    model = MarketModel(SEED)
    insts = instruments(n_symbols)
    symbols = [i.symbol for i in insts]

    t0 = time.perf_counter()
    frames = {i.symbol: minute_frame(model, i) for i in insts}
    generate_s = time.perf_counter() - t0
    rows = sum(len(f) for f in frames.values())
    log.info("generated %d rows for %d symbols in %.1f s", rows, len(frames), generate_s)

    t0 = time.perf_counter()
    for sym, frame in frames.items():
        frame.to_csv(csv_dir / f"{sym}_1m.csv")
    csv_write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for sym, frame in frames.items():
        write_store(store, sym, frame)
    store_write_s = time.perf_counter() - t0
    log.info("wrote CSV in %.1f s, store in %.1f s", csv_write_s, store_write_s)

    csv_bytes, csv_files = tree_bytes(csv_dir, "*.csv")
    store_bytes, store_files = tree_bytes(data_dir / "bars", "data.parquet")
    all_volume = np.concatenate([f["volume"].to_numpy() for f in frames.values()])
    threshold = float(np.quantile(all_volume, 0.99))
    sessions = len(calendars.sessions_on_dates(calendars.STOCK, FIRST_DAY, LAST_DAY, True))
    del frames, all_volume

    con = memory_connection(data_dir)
    try:
        q1, q1_view, q2 = daily_sql(), daily_sql(over_view=True), filter_sql(threshold)
        t1, r1 = alternate(reps, {"duckdb": lambda: on_connection(con, q1),
                                  "view": lambda: on_connection(con, q1_view),
                                  "sql_command": lambda: end_to_end(data_dir, q1),
                                  "csv": lambda: daily_pandas(csv_dir)})
        for name in ("duckdb", "view", "sql_command"):
            check_daily(r1[name].set_index("day"), r1["csv"])
        log.info("daily resample: %s", t1)
        t2, r2 = alternate(reps, {"duckdb": lambda: on_connection(con, q2),
                                  "sql_command": lambda: end_to_end(data_dir, q2),
                                  "csv": lambda: filter_pandas(csv_dir, symbols, threshold)})
        check_filter(r2["duckdb"], r2["csv"])
        check_filter(r2["sql_command"], r2["csv"])
        log.info("cross-symbol filter: %s", t2)
        diagnostics = diagnose(con, data_dir, q1, reps)
        log.info("daily resample diagnostics: %s", diagnostics)
    finally:
        con.close()

    ratio = store_bytes / csv_bytes
    return {
        "benchmark": "store_vs_csv",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "duckdb": duckdb.__version__, "pandas": pd.__version__, "pyarrow": pyarrow.__version__,
        "reps": reps,
        "data": {"symbols": len(symbols), "sessions": sessions, "rows": rows,
                 "first_day": FIRST_DAY.isoformat(), "last_day": LAST_DAY.isoformat(),
                 "timeframe": "1m", "use_rth": True, "csv_files": csv_files,
                 "store_files": store_files, "generate_s": round(generate_s, 2),
                 "query_csv_bytes": (csv_dir / f"{QUERY_SYMBOL}_1m.csv").stat().st_size,
                 "csv_write_s": round(csv_write_s, 2),
                 "store_write_s": round(store_write_s, 2)},
        "bytes": {"csv_bytes": csv_bytes, "store_bytes": store_bytes,
                  "ratio": round(ratio, 4), "target_ratio": TARGET_BYTES_RATIO,
                  "met": ratio <= TARGET_BYTES_RATIO},
        "daily_resample": {"symbol": QUERY_SYMBOL, "year": QUERY_YEAR, "sql": " ".join(
            q1.split()), "sql_view": " ".join(q1_view.split()), "rows": len(r1["duckdb"]),
            **summary(t1)},
        "cross_symbol_filter": {"month": QUERY_MONTH, "threshold": threshold,
                                "sql": " ".join(q2.split()), "rows": len(r2["duckdb"]),
                                **summary(t2)},
        "daily_resample_diagnostics": diagnostics,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--symbols", type=int, default=20, help="number of symbols (20)")
    p.add_argument("--reps", type=int, default=5, help="runs per query and contender (5)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--keep", type=Path, help="build the data here and keep it (default: a "
                                             "temporary directory, removed at the end)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_store_"))
    try:
        res = run(work, args.symbols, args.reps)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "store_vs_csv.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "store_vs_csv.md").write_text(markdown(res))
    log.info("bytes %.1f%% of CSV; daily resample %sx (sql command %sx); cross-symbol filter "
             "%sx (sql command %sx) -> %s", 100 * res["bytes"]["ratio"],
             res["daily_resample"]["speedup"], res["daily_resample"]["speedup_sql_command"],
             res["cross_symbol_filter"]["speedup"],
             res["cross_symbol_filter"]["speedup_sql_command"], args.out / "store_vs_csv.md")
    met = res["bytes"]["met"] and res["daily_resample"]["met"] and res[
        "cross_symbol_filter"]["met"]
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
