"""Reading bars: ``read_bars`` vs ArcticDB (LMDB) vs Polars, and the ``sql`` command at
50 / 500 / 2,000 symbols (issue 15).

Data: one symbol-year of 1-minute RTH TRADES bars (AAPL, 2025 in exchange time, about
97,000 rows) from bench_store's generator (the simulator's market model), written with
:class:`~ktrdr_pipeline.store.parquet.BarStore` (12 monthly files).

1. **Into a pandas DataFrame** (median of ``--reps`` alternating rounds, after one warm-up
   each): ``ktrdr_pipeline.read_bars("AAPL", "1m", start, end)`` (and its Arrow table);
   ArcticDB's ``lib.read("AAPL").data`` on an LMDB library holding the same frame (written
   once); Polars ``pl.read_parquet`` of the same 12 files (a Polars frame, and
   ``.to_pandas()`` of it); the catalog's ``symbol_bars`` through DuckDB. Every contender
   runs in its own process and is timed there (so no contender's thread pool or allocator
   state runs into another's timing), one read per round, the rounds alternating over the
   contenders; the per-round ratio's quartiles are reported next to the medians'. Target:
   ours within 2x of ArcticDB.
2. **Bytes on disk**: our 12 files vs ArcticDB's LMDB directory (allocated blocks, since
   LMDB's map file is sparse). Target: ours below ArcticDB's.
3. **The ``sql`` command end to end** (a subprocess, as from a shell; median of ``--reps``
   alternating over the sizes): ``sql "select 1"`` and a one-symbol query, both as
   ``bars_1m WHERE symbol = ...`` and through ``symbol_bars``, on universes of 50, 500 and
   2,000 symbols x 12 monthly files. The universes hold the same year's files under every
   symbol as hard links (the same bytes under 600 to 24,000 paths): what grows with the
   universe is what a query lists and opens, which is what this measures; each universe's
   partition manifest is rebuilt from the footers, as a store written by ``BarStore``
   has one. Peak memory
   (max RSS) of each subprocess is reported. Targets: the one-symbol query under 0.5 s at
   every size and within 1.5x of its time at 50 symbols.
4. **Streaming**: ``sql "select * from bars_1m" --format csv|parquet --output FILE`` at
   50 symbols (4.8 M rows): time and peak memory, against the result's size.

ArcticDB needs ``protobuf<7`` while Dagster's gRPC health check needs ``protobuf>=7``, so
it cannot live in the project's virtualenv: its process runs in its own interpreter
(``--arcticdb-python``, default ``benchmarks/.arcticdb-venv/bin/python``; make it with
``python3 -m venv benchmarks/.arcticdb-venv && benchmarks/.arcticdb-venv/bin/pip install
arcticdb pyarrow``), which loads the frame from a Parquet file, writes it to LMDB and
then answers timed reads on demand, alternating with ours. Polars is the optional extra
``bench`` (``pip install -e '.[bench]'``). A missing contender is reported as missing
(and its target as not measured), never silently skipped.

Run ``python -m benchmarks.bench_read`` (or ``benchmarks/run read``) from the repository
root; results go to ``benchmarks/results/read.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import duckdb  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow  # noqa: E402

from benchmarks import bench_store  # noqa: E402
from ktrdr_pipeline.simulator.market import MarketModel  # noqa: E402
from ktrdr_pipeline.store.parquet import BarStore  # noqa: E402

log = logging.getLogger("benchmarks.bench_read")

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_ARCTIC_PYTHON = Path(__file__).resolve().parent / ".arcticdb-venv" / "bin" / "python"
SYMBOL, YEAR = "AAPL", 2025
SIZES = (50, 500, 2000)
TARGET_VS_ARCTIC = 2.0
TARGET_SQL_S = 0.5
TARGET_SQL_GROWTH = 1.5

# One contender in its own process: set up, read once (warm-up), then time one read per
# "read" line on stdin, answering with the time, the rows and the sum of the closes (checked
# against the others; computed outside the timing). Each contender has its own process so
# that no contender's thread pool (Polars', DuckDB's, ArcticDB's) or allocator state runs
# into another's timing; ArcticDB's runs in its own interpreter (see the docstring).
READ_WORKER = textwrap.dedent("""
    import json, sys, time
    cfg = json.loads(sys.argv[1])
    kind, files = cfg["kind"], cfg["files"]
    if kind == "arcticdb":
        import pyarrow.parquet as pq
        from arcticdb import Arctic
        frame = pq.read_table(cfg["frame"]).to_pandas()
        lib = Arctic(cfg["uri"]).get_library("bars", create_if_missing=True)
        lib.write(cfg["symbol"], frame)
        back = lib.read(cfg["symbol"]).data
        assert len(back) == len(frame) and (back.index == frame.index).all()
        read = lambda: lib.read(cfg["symbol"]).data
    elif kind in ("read_bars", "read_bars_arrow"):
        import ktrdr_pipeline
        as_ = "arrow" if kind == "read_bars_arrow" else "pandas"
        read = lambda: ktrdr_pipeline.read_bars(cfg["symbol"], "1m", cfg["lo"], cfg["hi"],
                                                data_dir=cfg["data_dir"], as_=as_)
    elif kind == "catalog_df":
        from ktrdr_pipeline.store.catalog import memory_connection
        con = memory_connection(cfg["data_dir"])
        sql = (f"SELECT * FROM symbol_bars('1m', '{cfg['symbol']}') WHERE ts >= "
               f"'{cfg['lo']}' AND ts < '{cfg['hi']}'")
        read = lambda: con.execute(sql).df()
    elif kind in ("polars", "polars_to_pandas"):
        import polars as pl
        if kind == "polars":
            read = lambda: pl.read_parquet(files)
        else:
            read = lambda: pl.read_parquet(files).to_pandas()
    else:
        raise SystemExit(f"unknown contender {kind}")

    def answer(data):
        if hasattr(data, "num_rows"):  # an Arrow table
            import pyarrow.compute as pc
            return data.num_rows, pc.sum(data.column("close")).as_py()
        if hasattr(data, "height"):  # a Polars frame
            return data.height, float(data["close"].sum())
        return len(data), float(data["close"].sum())

    rows, close_sum = answer(read())
    print(json.dumps({"ready": True, "rows": rows}), flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        data = read()
        dt = time.perf_counter() - t0
        rows, close_sum = answer(data)
        del data
        print(json.dumps({"s": dt, "rows": rows, "close_sum": close_sum}), flush=True)
""")


# -- data ------------------------------------------------------------------------------------
def symbol_year(data_dir: Path) -> tuple[pd.DataFrame, list[Path]]:
    """AAPL's 2025 1-minute bars written with BarStore; the frame and its files."""
    model = MarketModel(bench_store.SEED)
    inst = bench_store.instruments(1)[0]
    frame = bench_store.minute_frame(model, inst)
    lo, hi = bench_store.year_bounds_utc(YEAR)
    frame = frame[(frame.index >= lo) & (frame.index < hi)]
    bench_store.write_store(BarStore(data_dir), inst.symbol, frame)
    files = sorted((data_dir / "bars" / "timeframe=1m" / f"symbol={inst.symbol}").glob(
        "period=*/data.parquet"))
    return frame, files


def universe(data_dir: Path, src_files: list[Path], n: int) -> int:
    """``n`` symbols (SYM0000...) holding ``src_files`` as hard links; returns the file
    count."""
    count = 0
    for k in range(n):
        for f in src_files:
            period = f.parent.name
            target = data_dir / "bars" / "timeframe=1m" / f"symbol=SYM{k:04d}" / period
            target.mkdir(parents=True, exist_ok=True)
            dest = target / "data.parquet"
            if not dest.exists():
                os.link(f, dest)
            count += 1
    return count


def allocated_bytes(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def apparent_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# -- contenders ------------------------------------------------------------------------------
class Worker:
    """One contender in its own interpreter (:data:`READ_WORKER`)."""

    def __init__(self, python: Path, cfg: dict[str, Any]):
        env = {**os.environ,
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.kind = cfg["kind"]
        self.proc = subprocess.Popen([str(python), "-c", READ_WORKER, json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=REPO)
        ready = json.loads(self.proc.stdout.readline() or "{}")
        if not ready.get("ready"):
            raise RuntimeError(f"the {self.kind} worker did not start (see its stderr)")
        self.rows = ready["rows"]

    def read(self) -> dict[str, Any]:
        self.proc.stdin.write("read\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def arctic_python(requested: Path | None) -> tuple[Path | None, str]:
    candidates = [requested] if requested else [Path(sys.executable), DEFAULT_ARCTIC_PYTHON]
    for py in candidates:
        if py and py.exists() and subprocess.run(
                [str(py), "-c", "import arcticdb"], capture_output=True).returncode == 0:
            return py, ""
    return None, ("ArcticDB is not installed: make benchmarks/.arcticdb-venv (see "
                  "bench_read.py's docstring) or pass --arcticdb-python")


def read_contenders(data_dir: Path, frame: pd.DataFrame, files: list[Path], work: Path,
                    reps: int, arctic_py: Path | None) -> dict[str, Any]:
    lo, hi = bench_store.year_bounds_utc(YEAR)
    base = {"symbol": SYMBOL, "data_dir": str(data_dir), "files": [str(f) for f in files],
            "lo": str(lo), "hi": str(hi)}
    kinds = ["read_bars", "read_bars_arrow", "catalog_df"]
    missing: dict[str, str] = {}
    try:
        import polars as pl

        polars_version = pl.__version__
        kinds += ["polars", "polars_to_pandas"]
    except ImportError:
        polars_version = None
        missing["polars"] = "Polars is not installed: pip install -e '.[bench]'"
    workers: dict[str, Worker] = {}
    arctic_bytes = None
    try:
        for kind in kinds:
            workers[kind] = Worker(Path(sys.executable), {**base, "kind": kind})
        if arctic_py is not None:
            frame_file = work / "frame.parquet"
            frame.to_parquet(frame_file)
            workers["arcticdb"] = Worker(arctic_py, {
                **base, "kind": "arcticdb", "frame": str(frame_file),
                "uri": f"lmdb://{work / 'arctic_lmdb'}"})
        else:
            missing["arcticdb"] = "not installed"
        times: dict[str, list[float]] = {name: [] for name in workers}
        sums: dict[str, float] = {}
        for _ in range(reps):
            for name, worker in workers.items():
                res = worker.read()
                if res["rows"] != len(frame):
                    raise AssertionError(f"{name} read {res['rows']} rows, not {len(frame)}")
                times[name].append(res["s"])
                sums[name] = res["close_sum"]
        want = float(frame["close"].sum())
        for name, got in sums.items():
            if abs(got - want) > 1e-6 * abs(want):
                raise AssertionError(f"{name} returned different closes ({got} vs {want})")
    finally:
        for worker in workers.values():
            worker.close()
        if "arcticdb" in workers:
            arctic_bytes = {"allocated": allocated_bytes(work / "arctic_lmdb"),
                            "apparent": apparent_bytes(work / "arctic_lmdb")}
    ours_bytes = {"allocated": sum(f.stat().st_blocks * 512 for f in files),
                  "apparent": sum(f.stat().st_size for f in files)}
    med = {name: statistics.median(t) for name, t in times.items()}
    out: dict[str, Any] = {
        "rows": len(frame), "files": len(files), "polars": polars_version,
        "times_s": {k: [round(x, 5) for x in v] for k, v in times.items()},
        "median_ms": {k: round(v * 1000, 2) for k, v in med.items()},
        "bytes": {"ours": ours_bytes, "arcticdb": arctic_bytes},
        "missing": missing,
    }
    if "arcticdb" in med:
        ratio = med["read_bars"] / med["arcticdb"]
        out["ratio_vs_arcticdb"] = round(ratio, 2)
        # the ratio within each round (both read seconds apart): its spread shows the noise
        per_round = sorted(a / b for a, b in zip(times["read_bars"], times["arcticdb"],
                                                 strict=True))
        out["ratio_per_round"] = {"p25": round(per_round[len(per_round) // 4], 2),
                                  "median": round(statistics.median(per_round), 2),
                                  "p75": round(per_round[(3 * len(per_round)) // 4], 2)}
        out["met_speed"] = ratio <= TARGET_VS_ARCTIC
        out["met_bytes"] = ours_bytes["allocated"] < arctic_bytes["allocated"]
    else:
        out["met_speed"] = out["met_bytes"] = None
    return out


# -- the sql command -------------------------------------------------------------------------
#: Runs a command and writes its wall time and peak RSS to the fd it is given. Linux counts a forked
#: child's memory before its exec in its peak RSS, so the sql process must be forked from
#: this small launcher, not from the benchmark (which holds the generated bars).
LAUNCHER = textwrap.dedent("""
    import os, sys, time
    t0 = time.perf_counter()
    pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
    _, status, usage = os.wait4(pid, 0)
    os.write(int(sys.argv[1]), f"{time.perf_counter() - t0} {usage.ru_maxrss} "
                f"{os.waitstatus_to_exitcode(status)}".encode())
""")


def run_sql_rss(data_dir: Path, args: list[str]) -> tuple[float, int, str]:
    """One ``ktrdr-pipeline sql`` subprocess: wall time (from the launcher's fork to the
    exit), peak RSS (KB), stdout."""
    env = {**os.environ, "KTRDR_DATA_DIR": str(data_dir),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(write_fd), sys.executable, "-m",
             "ktrdr_pipeline.cli", "sql", *args], env=env, stdout=out_f, stderr=err_f,
            pass_fds=(write_fd,))
        os.close(write_fd)
        with os.fdopen(read_fd) as report:
            text = report.read()
        proc.wait()
        out_f.seek(0)
        err_f.seek(0)
        dt, peak, code = text.split()
        if proc.returncode != 0 or int(code) != 0:
            raise RuntimeError(f"sql {args} failed: {err_f.read()}")
        return float(dt), int(peak), out_f.read()


def sql_scaling(work: Path, files: list[Path], reps: int) -> tuple[dict[str, Any], dict]:
    dirs = {}
    for n in SIZES:
        d = work / f"u{n}"
        t0 = time.perf_counter()
        count = universe(d, files, n)
        built = time.perf_counter() - t0
        # a store written by BarStore has its partition manifest; hard links bypass the
        # writes, so the manifest is rebuilt from the footers (what `manifest rebuild` does)
        t0 = time.perf_counter()
        listed = BarStore(d).rebuild_manifest()
        log.info("universe of %d symbols: %d files in %.1f s, manifest of %d partitions in "
                 "%.1f s", n, count, built, listed, time.perf_counter() - t0)
        dirs[n] = (d, count)
    lo, hi = bench_store.year_bounds_utc(YEAR)
    probe = "SYM0042"
    queries = {
        "select_1": "select 1",
        "one_symbol_view": f"SELECT max(high), count(*) FROM bars_1m WHERE symbol = '{probe}' "
                           f"AND ts >= '{lo}' AND ts < '{hi}'",
        "one_symbol_macro": f"SELECT max(high), count(*) FROM symbol_bars('1m', '{probe}') "
                            f"WHERE ts >= '{lo}' AND ts < '{hi}'",
    }
    times: dict[str, dict[int, list[float]]] = {q: {n: [] for n in SIZES} for q in queries}
    rss: dict[str, dict[int, int]] = {q: {} for q in queries}
    answers: dict[str, set[str]] = {q: set() for q in queries}
    for k in range(reps + 1):  # round 0: warm-up (file system caches), not counted
        for n in SIZES:
            for name, sql in queries.items():
                dt, peak, out = run_sql_rss(dirs[n][0], [sql, "--format", "csv"])
                if k:
                    times[name][n].append(dt)
                    rss[name][n] = max(rss[name].get(n, 0), peak)
                answers[name].add(out)
    for name, outs in answers.items():
        if len(outs) != 1:
            raise AssertionError(f"{name}: different answers at different sizes: {outs}")
    med = {q: {n: statistics.median(v) for n, v in per.items()} for q, per in times.items()}
    result: dict[str, Any] = {
        "files": {n: c for n, (_, c) in dirs.items()}, "queries": queries,
        "times_s": {q: {n: [round(x, 4) for x in v] for n, v in per.items()}
                    for q, per in times.items()},
        "median_s": {q: {n: round(v, 4) for n, v in per.items()} for q, per in med.items()},
        "peak_rss_mb": {q: {n: round(v / 1024, 1) for n, v in per.items()}
                        for q, per in rss.items()},
    }
    for q in ("one_symbol_view", "one_symbol_macro"):
        growth = max(med[q][n] for n in SIZES) / med[q][SIZES[0]]
        result[f"{q}_growth"] = round(growth, 2)
        result[f"{q}_met"] = (all(v < TARGET_SQL_S for v in med[q].values())
                              and growth <= TARGET_SQL_GROWTH)
    return result, dirs


def streaming(dirs: dict, work: Path) -> dict[str, Any]:
    data_dir, _ = dirs[SIZES[0]]
    out: dict[str, Any] = {}
    for fmt in ("parquet", "csv"):
        target = work / f"all.{fmt}"
        dt, peak, _ = run_sql_rss(data_dir, ["SELECT * FROM bars_1m", "--format", fmt,
                                             "--output", str(target)])
        out[fmt] = {"s": round(dt, 2), "peak_rss_mb": round(peak / 1024, 1),
                    "output_mb": round(target.stat().st_size / 1e6, 1)}
        target.unlink()
    out["rows"] = duckdb.connect().execute(
        f"SELECT count(*) FROM read_parquet('{data_dir}/bars/timeframe=1m/*/*/data.parquet')"
    ).fetchone()[0]
    return out


# -- report ----------------------------------------------------------------------------------
def markdown(res: dict[str, Any]) -> str:
    r, s, st = res["read"], res["sql"], res["streaming"]
    m = r["median_ms"]

    def ok(flag: bool | None) -> str:
        return "not measured" if flag is None else ("met" if flag else "**not met**")

    def ms(name: str) -> str:
        return f"{m[name]:.1f} ms" if name in m else "missing"

    b = r["bytes"]
    arctic_b = b["arcticdb"]["allocated"] if b["arcticdb"] else None
    lines = [
        "# Reading bars: read_bars vs ArcticDB vs Polars; the sql command at scale",
        "",
        f"{res['date']}, {res['cores']} cores, Python {res['python']}, DuckDB {res['duckdb']}, "
        f"pandas {res['pandas']}, pyarrow {res['pyarrow']}, Polars {r['polars'] or 'missing'}. "
        "Produced by `python -m benchmarks.bench_read`; method in its docstring.",
        "",
        f"One symbol-year of 1-minute bars ({SYMBOL} {YEAR}, {r['rows']:,} rows, "
        f"{r['files']} monthly files) into a DataFrame, medians of {res['reps']} alternating "
        "rounds, each contender in its own process:",
        "",
        "| contender | median | vs ArcticDB |",
        "|---|---|---|",
    ]
    labels = {"read_bars": "`ktrdr_pipeline.read_bars(...)` (pandas)",
              "read_bars_arrow": "`read_bars(..., as_=\"arrow\")` (Arrow table)",
              "catalog_df": "`symbol_bars(...)` on an open DuckDB connection, `.df()`",
              "arcticdb": "ArcticDB (LMDB) `lib.read(...).data`",
              "polars": "Polars `read_parquet` of the same files (Polars frame)",
              "polars_to_pandas": "Polars `read_parquet(...).to_pandas()`"}
    for name, label in labels.items():
        if name in m:
            vs = (f"{m[name] / m['arcticdb']:.2f}x" if "arcticdb" in m else "-")
            lines.append(f"| {label} | {ms(name)} | {vs} |")
        else:
            lines.append(f"| {label} | missing: {r['missing'].get(name, 'not installed')} | - |")
    lines += [
        "",
        "| target | measured | result |",
        "|---|---|---|",
        f"| read_bars within {TARGET_VS_ARCTIC:g}x of ArcticDB | "
        f"{r.get('ratio_vs_arcticdb', 'n/a')}x (per round: quartiles "
        f"{r.get('ratio_per_round', {}).get('p25', 'n/a')}-"
        f"{r.get('ratio_per_round', {}).get('p75', 'n/a')}x) | {ok(r['met_speed'])} |",
        f"| bytes on disk below ArcticDB's | ours {b['ours']['allocated']:,} vs ArcticDB "
        f"{arctic_b if arctic_b is None else format(arctic_b, ',')} | {ok(r['met_bytes'])} |",
    ]
    for q, label in (("one_symbol_view", "`bars_1m WHERE symbol = ...`"),
                     ("one_symbol_macro", "`symbol_bars('1m', ...)`")):
        figs = ", ".join(f"{s['median_s'][q][n] * 1000:.0f} ms" for n in SIZES)
        lines.append(f"| sql one-symbol query {label} end to end < {TARGET_SQL_S} s at "
                     f"{'/'.join(map(str, SIZES))} symbols, <= {TARGET_SQL_GROWTH}x of 50 | "
                     f"{figs} ({s[f'{q}_growth']}x) | {ok(s[f'{q}_met'])} |")
    lines += [
        "",
        "The `sql` command end to end (a subprocess: interpreter, imports, DuckDB, views, "
        "query), medians in ms, peak RSS in MB:",
        "",
        "| statement | " + " | ".join(f"{n} symbols ({s['files'][n]:,} files)" for n in SIZES)
        + " |",
        "|---|" + "---|" * len(SIZES),
    ]
    for q in s["queries"]:
        lines.append(f"| {q}: `{' '.join(s['queries'][q].split())[:70]}` | " + " | ".join(
            f"{s['median_s'][q][n] * 1000:.0f} ms, {s['peak_rss_mb'][q][n]:.0f} MB"
            for n in SIZES) + " |")
    lines += [
        "",
        f"Streaming a big result at {SIZES[0]} symbols (`SELECT * FROM bars_1m`, "
        f"{st['rows']:,} rows) into a file: parquet {st['parquet']['s']} s, peak "
        f"{st['parquet']['peak_rss_mb']} MB ({st['parquet']['output_mb']} MB written); csv "
        f"{st['csv']['s']} s, peak {st['csv']['peak_rss_mb']} MB "
        f"({st['csv']['output_mb']} MB written).",
        "",
        "Bytes: allocated blocks (`st_blocks`), since LMDB's map file is sparse; apparent "
        f"sizes: ours {b['ours']['apparent']:,}, ArcticDB "
        f"{b['arcticdb']['apparent'] if b['arcticdb'] else 'n/a'}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7, help="rounds per measurement (7)")
    p.add_argument("--sql-reps", type=int, default=5, help="rounds of the sql subprocesses (5)")
    p.add_argument("--arcticdb-python", type=Path, default=None,
                   help="an interpreter with arcticdb (default: this one, else "
                        "benchmarks/.arcticdb-venv/bin/python)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--keep", type=Path, help="build the data here and keep it")
    p.add_argument("--quick", action="store_true",
                   help="only the DataFrame read and the bytes (parts 1-2), logged; skips "
                        "the sql command at scale and the streaming, writes no results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    arctic_py, why = arctic_python(args.arcticdb_python)
    if arctic_py is None:
        log.warning("%s; its figures will be reported as missing", why)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_read_"))
    try:
        data_dir = work / "one"
        frame, files = symbol_year(data_dir)
        log.info("%d rows in %d files", len(frame), len(files))
        read = read_contenders(data_dir, frame, files, work, args.reps, arctic_py)
        log.info("read: %s (%.2fx of ArcticDB)", read["median_ms"],
                 read.get("ratio_vs_arcticdb", float("nan")))
        log.info("bytes: %s", read["bytes"])
        if args.quick:
            return 0 if read["met_speed"] and read["met_bytes"] else 1
        sql, dirs = sql_scaling(work, files, args.sql_reps)
        log.info("sql: %s", sql["median_s"])
        stream = streaming(dirs, work)
        log.info("streaming: %s", stream)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    res = {"benchmark": "read", "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "cores": os.cpu_count(), "python": platform.python_version(),
           "duckdb": duckdb.__version__, "pandas": pd.__version__,
           "pyarrow": pyarrow.__version__, "reps": args.reps, "read": read, "sql": sql,
           "streaming": stream}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "read.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (args.out / "read.md").write_text(markdown(res))
    flags = [read["met_speed"], read["met_bytes"], sql["one_symbol_view_met"],
             sql["one_symbol_macro_met"]]
    log.info("-> %s", args.out / "read.md")
    return 0 if all(f is True for f in flags) else 1


if __name__ == "__main__":
    sys.exit(main())
