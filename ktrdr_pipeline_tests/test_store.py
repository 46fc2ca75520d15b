"""The bar store: Parquet partitions, the validation schema, the DuckDB catalog and queries."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import duckdb
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ktrdr_pipeline import locking
from ktrdr_pipeline.domain import calendars
from ktrdr_pipeline.domain.bars import (
    BAR_COLUMNS,
    FetchState,
    PartitionMeta,
    empty_bars,
    fetch_state,
)
from ktrdr_pipeline.domain.timeframes import get_timeframe
from ktrdr_pipeline.simulator.market import C, H, L, MarketModel, N, O, T, V, W
from ktrdr_pipeline.simulator.universe import build_universe
from ktrdr_pipeline.store import catalog as cat
from ktrdr_pipeline.store import parquet as pqstore
from ktrdr_pipeline.store.parquet import BarStore
from ktrdr_pipeline.store.schema import (
    FAILURE_COLUMNS,
    BarValidationError,
    duplicate_or_unsorted,
    ohlc_violations,
    outside_session_bars,
    session_violations,
    validate_bars,
)

from .lockholder import DuckDBLockHolder

REPO = Path(__file__).resolve().parents[1]
TODAY = date(2026, 11, 30)
NOW = datetime(2026, 11, 30, 18, 0, tzinfo=UTC)  # a Monday, markets open
UNIVERSE = build_universe(TODAY)
MODEL = MarketModel(seed=11)
AAPL = UNIVERSE.by_symbol("AAPL", "STK")[0]
SPY = UNIVERSE.by_symbol("SPY", "STK")[0]
EURUSD = UNIVERSE.by_symbol("EUR", "CASH")[0]
ES = UNIVERSE.front_future("ES", TODAY)
BAR_SIZES = {"1m": "1 min", "5m": "5 mins", "15m": "15 mins", "1h": "1 hour", "4h": "4 hours",
             "8h": "8 hours", "1d": "1 day", "1w": "1 week", "1mo": "1 month"}


@pytest.fixture(autouse=True)
def _default_timeframes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KTRDR_TIMEFRAMES", raising=False)


def block_to_frame(block: np.ndarray) -> pd.DataFrame:
    """A simulator bar block in the pipeline's frame format (as ``bars_to_frame`` builds
    it from IB's answer: -1 volume/WAP become NaN, -1 counts 0)."""
    index = pd.DatetimeIndex(pd.to_datetime(block[:, T].astype(np.int64), unit="s", utc=True),
                             name="ts").as_unit("ns")
    frame = pd.DataFrame({"open": block[:, O], "high": block[:, H], "low": block[:, L],
                          "close": block[:, C], "volume": block[:, V], "wap": block[:, W],
                          "bar_count": block[:, N]}, index=index)
    frame.loc[frame["volume"] < 0, "volume"] = np.nan
    frame.loc[frame["wap"] < 0, "wap"] = np.nan
    frame["bar_count"] = frame["bar_count"].clip(lower=0).astype("int64")
    return frame


def sim_bars(inst, tf: str, start: datetime, end: datetime, use_rth: bool,
             what: str = "TRADES") -> pd.DataFrame:
    block = MODEL.bars(inst, BAR_SIZES[tf], start, end, use_rth, NOW)
    if what != "TRADES":  # FX: IB reports no volume, WAP or count
        block = block.copy()
        block[:, V] = block[:, W] = block[:, N] = -1
    return block_to_frame(block)


def minute_frame(start: str, n: int, step: str = "1min") -> pd.DataFrame:
    idx = pd.DatetimeIndex(list(pd.date_range(start, periods=n, freq=step, tz="UTC")),
                           name="ts").as_unit("ns")
    rng = np.random.default_rng(n)
    close = 100 + np.cumsum(rng.normal(0, 0.1, n)).round(2)
    open_ = np.r_[100.0, close[:-1]]
    return pd.DataFrame({
        "open": open_, "high": np.maximum(open_, close) + 0.05,
        "low": np.minimum(open_, close) - 0.05, "close": close,
        "volume": rng.integers(0, 1000, n).astype(float), "wap": (open_ + close) / 2,
        "bar_count": rng.integers(0, 50, n).astype("int64")}, index=idx)


def write(store: BarStore, tf: str, symbol: str, period: str, frame: pd.DataFrame,
          **meta) -> Path:
    return store.write(tf, symbol, period, frame, use_rth=meta.pop("use_rth", True),
                       what_to_show=meta.pop("what_to_show", "TRADES"), extra_meta=meta or None)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# == the Parquet store ==========================================================================
def test_round_trip_keeps_dtypes_tz_and_nan(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    frame = minute_frame("2024-03-04 14:30", 120)
    frame.iloc[::7, frame.columns.get_loc("volume")] = np.nan  # FX-like: no volume
    frame.iloc[::5, frame.columns.get_loc("wap")] = np.nan
    path = write(store, "1m", "AAPL", "2024-03", frame)
    assert path == tmp_path / "bars/timeframe=1m/symbol=AAPL/period=2024-03/data.parquet"
    back = store.read("1m", "AAPL", "2024-03")
    pd.testing.assert_frame_equal(back, frame)
    assert str(back.index.tz) == "UTC" and back.index.name == "ts"
    assert list(back.columns) == BAR_COLUMNS
    assert back["bar_count"].dtype == np.int64
    assert back["volume"].isna().sum() == frame["volume"].isna().sum()

    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    assert str(schema.field("ts").type) == "timestamp[us, tz=UTC]"
    assert [str(schema.field(c).type) for c in BAR_COLUMNS] == ["double"] * 6 + ["int64"]


def test_round_trip_of_simulator_bars_with_the_frame_format(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    frame = sim_bars(EURUSD, "1h", datetime(2026, 11, 1, tzinfo=UTC),
                     datetime(2026, 11, 28, tzinfo=UTC), False, what="MIDPOINT")
    assert frame["volume"].isna().all()
    write(store, "1h", "EURUSD", "2026", frame, use_rth=False, what_to_show="MIDPOINT")
    pd.testing.assert_frame_equal(store.read("1h", "EURUSD", "2026"), frame)


def test_absent_partition_reads_empty(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    pd.testing.assert_frame_equal(store.read("1m", "AAPL", "2024-03"), empty_bars())
    assert store.read_meta("1m", "AAPL", "2024-03") is None
    assert store.partitions() == [] and store.symbols() == []
    assert not store.delete("1m", "AAPL", "2024-03")


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.iloc[::-1], "not sorted"),
    (lambda f: pd.concat([f, f.iloc[[3]]]).sort_index(), "duplicate ts"),
    (lambda f: f.set_axis(f.index - pd.Timedelta(days=40)), "outside the period"),
    (lambda f: f.set_axis(f.index.tz_localize(None)), "naive"),
    (lambda f: f.drop(columns="wap"), "missing ['wap']"),
    (lambda f: f.assign(extra=1.0), "unexpected ['extra']"),
    (lambda f: f.assign(bar_count=np.nan), "bar_count has missing"),
    (lambda f: f.reset_index(), "DatetimeIndex"),
])
def test_write_refuses_bad_frames(tmp_path: Path, mutate, message: str) -> None:
    store = BarStore(tmp_path)
    frame = minute_frame("2024-03-04 14:30", 10)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        write(store, "1m", "AAPL", "2024-03", mutate(frame))
    assert not store.path("1m", "AAPL", "2024-03").exists()


def test_period_bounds_are_exchange_time_for_intraday(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    # 2024-04-01 02:00 UTC is still March 31 in New York: it belongs to 2024-03
    frame = minute_frame("2024-04-01 02:00", 3)
    write(store, "1m", "EURUSD", "2024-03", frame)
    with pytest.raises(ValueError, match="outside the period"):
        write(store, "1m", "EURUSD", "2024-04", frame)


def test_write_is_atomic_when_the_writer_fails_midway(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store = BarStore(tmp_path)
    old = minute_frame("2024-03-04 14:30", 50)
    write(store, "1m", "AAPL", "2024-03", old, con_id="1")

    def broken(table, sink) -> None:
        sink.write(b"PAR1" + b"\0" * 4096)  # half a file ...
        raise OSError("disk full")  # ... then the writer dies

    monkeypatch.setattr(pqstore, "_write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-05 14:30", 80), con_id="2")
    pd.testing.assert_frame_equal(store.read("1m", "AAPL", "2024-03"), old)
    assert store.read_meta("1m", "AAPL", "2024-03").con_id == "1"
    directory = store.path("1m", "AAPL", "2024-03").parent
    assert sorted(p.name for p in directory.iterdir()) == ["data.parquet"]


_DIE_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    import pandas as pd
    from ktrdr_pipeline.store import parquet as P

    def die(table, sink):
        sink.write(b"PAR1" + b"x" * 5000)
        sink.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    P._write_table = die
    P.BarStore(sys.argv[1]).write("1m", "AAPL", "2024-03", pd.read_pickle(sys.argv[2]),
                                  use_rth=True, what_to_show="TRADES")
""")


def kill_mid_write(data_dir: Path, frame: pd.DataFrame) -> None:
    """A writer process of AAPL's 1-minute March 2024 with ``frame``, killed (SIGKILL) in
    the middle of writing its temporary file."""
    pickled = data_dir / "new.pkl"
    frame.to_pickle(pickled)
    proc = subprocess.run([sys.executable, "-c", _DIE_MID_WRITE, str(data_dir), str(pickled)],
                          env=subprocess_env(), timeout=60, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def test_killed_writer_leaves_old_file_and_a_tmp_the_next_write_removes(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    old = minute_frame("2024-03-04 14:30", 50)
    write(store, "1m", "AAPL", "2024-03", old)
    new = minute_frame("2024-03-05 14:30", 70)
    kill_mid_write(tmp_path, new)
    directory = store.path("1m", "AAPL", "2024-03").parent
    leftovers = [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1
    # readers ignore the leftover: the store, its listing and DuckDB's glob
    pd.testing.assert_frame_equal(store.read("1m", "AAPL", "2024-03"), old)
    assert store.partitions() == [("1m", "AAPL", "2024-03")]
    assert cat.run_query(tmp_path, "SELECT count(*) FROM bars_1m").rows == [(50,)]
    # the next write replaces the file and removes the dead writer's temporary file
    write(store, "1m", "AAPL", "2024-03", new)
    pd.testing.assert_frame_equal(store.read("1m", "AAPL", "2024-03"), new)
    assert sorted(p.name for p in directory.iterdir()) == ["data.parquet"]


def test_tmp_files_of_live_writers_are_left_alone(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 5))
    directory = store.path("1m", "AAPL", "2024-03").parent
    live = directory / f"data.parquet.{os.getppid()}.abcdef.tmp"  # our parent is alive
    stray = directory / "data.parquet.tmp"  # not this store's pattern: abandoned
    live.write_bytes(b"partial")
    stray.write_bytes(b"partial")
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 6))
    assert live.exists() and not stray.exists()
    old = time.time() - 2 * pqstore.STALE_TMP_AGE_S
    os.utime(live, (old, old))
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 7))
    assert not live.exists()


@pytest.mark.parametrize("tf, symbol, period, message", [
    ("1m", "../AAPL", "2024-03", "symbol"),
    ("1m", "AAPL/../../etc", "2024-03", "symbol"),
    ("1m", "..", "2024-03", "symbol"),
    ("1m", ".", "2024-03", "symbol"),
    ("1m", "", "2024-03", "symbol"),
    ("1m", "/etc/passwd", "2024-03", "symbol"),
    ("1m", "A\\B", "2024-03", "symbol"),
    ("1m", "AAPL\0", "2024-03", "symbol"),
    ("1m", "aapl", "2024-03", "symbol"),
    ("1m", "AAPL ", "2024-03", "symbol"),
    ("1m", "EUR/USD", "2024-03", "symbol"),
    ("1m", "AAPL:STK", "2024-03", "symbol"),
    ("1m", "AAPL", "../2024-03", "period"),
    ("1m", "AAPL", "2024-03/../../x", "period"),
    ("1m", "AAPL", "2024-3", "period"),
    ("1m", "AAPL", "2024-13", "period"),
    ("1m", "AAPL", "2024-03-01", "period"),
    ("1m", "AAPL", "", "period"),
    ("1d", "AAPL", "0000", "period"),
    ("1d", "AAPL", "2024-03", "period"),
    ("1s", "AAPL", "2024-02-30", "period"),
    ("1x", "AAPL", "2024-03", "timeframe"),
    ("../1m", "AAPL", "2024-03", "timeframe"),
    (" 1m", "AAPL", "2024-03", "timeframe"),
    ("", "AAPL", "2024-03", "timeframe"),
])
def test_paths_are_validated_before_touching_the_filesystem(tmp_path: Path, tf: str, symbol: str,
                                                            period: str, message: str) -> None:
    store = BarStore(tmp_path / "data")
    frame = minute_frame("2024-03-04 14:30", 3)
    for call in (lambda: store.path(tf, symbol, period), lambda: store.read(tf, symbol, period),
                 lambda: store.read_meta(tf, symbol, period),
                 lambda: store.delete(tf, symbol, period),
                 lambda: write(store, tf, symbol, period, frame)):
        with pytest.raises(ValueError, match=message):
            call()
    assert not (tmp_path / "data").exists()


def test_valid_keys_stay_inside_the_store(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    for tf, sym, period in [("1m", "BRK.B", "2024-03"), ("1s", "ES_FUT_202612", "2026-11"),
                            ("1d", "EURUSD", "2026"), ("1mo", "SPY", "2026")]:
        path = store.path(tf, sym, period).resolve()
        assert path.is_relative_to((tmp_path / "bars").resolve())
        assert path.name == "data.parquet"


def test_fetch_state_round_trips_typed_and_unknown_keys_are_kept(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    state = FetchState(con_id="265598", fetched_at="2026-11-30T12:00:00+00:00",
                       partial_from=1764504000, asked_until=1764504060,
                       empty_runs=((1764500000, 1764500120), (1764501000, 1764501060)))
    store.write("1m", "AAPL", "2026-11", minute_frame("2026-11-30 14:30", 3), use_rth=True,
                what_to_show="TRADES", fetch=state, extra_meta={"source": "a test"})
    frame, meta = store.read_with_meta("1m", "AAPL", "2026-11")
    assert len(frame) == 3 and meta.fetch == state and meta.extra == {"source": "a test"}
    assert PartitionMeta.from_json(meta.to_json()) == meta
    assert fetch_state(None) == FetchState() and fetch_state(meta) == state
    # a partition written before the typed record (or by hand) reads the same way
    legacy = {"use_rth": "true", "what_to_show": "TRADES", "partial_from": "",
              "empty_runs": [[5, 6], [1, 2]], "asked_until": "7", "con_id": 42}
    parsed = PartitionMeta.from_json(legacy)
    assert parsed.use_rth is True and parsed.partial_from is None
    assert parsed.empty_runs == ((1, 2), (5, 6)) and parsed.asked_until == 7
    assert parsed.con_id == "42"


def test_metadata_round_trip(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    fetched = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    store.write("1h", "EURUSD", "2026", minute_frame("2026-03-02 10:00", 4, "1h"),
                use_rth=False, what_to_show="MIDPOINT",
                extra_meta={"con_id": 12087792, "fetched_at": fetched, "partial_from": ""})
    meta = store.read_meta("1h", "EURUSD", "2026")
    assert meta.use_rth is False and meta.what_to_show == "MIDPOINT"
    assert meta.con_id == "12087792" and meta.fetched_at == fetched.isoformat()
    assert meta.rows == 4 and meta.timeframe == "1h" and meta.symbol == "EURUSD"
    assert meta.period == "2026" and meta.written_at is not None
    assert meta.partial_from is None and meta.empty_runs == () and meta.asked_until is None
    with pytest.raises(ValueError, match="reserved"):
        store.write("1h", "EURUSD", "2026", empty_bars(), use_rth=False,
                    what_to_show="MIDPOINT", extra_meta={"use_rth": True})
    with pytest.raises(ValueError, match="use_rth"):
        store.write("1h", "EURUSD", "2026", empty_bars(), use_rth="yes",  # type: ignore[arg-type]
                    what_to_show="MIDPOINT")
    assert store.read_meta("1h", "EURUSD", "2026").con_id == "12087792"
    # an empty partition is a valid partition (a period without bars)
    store.write("1h", "EURUSD", "2025", empty_bars(), use_rth=False, what_to_show="MIDPOINT")
    assert store.read_meta("1h", "EURUSD", "2025").rows == 0
    assert len(store.read("1h", "EURUSD", "2025")) == 0


def test_partitions_listing(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    write(store, "1m", "MSFT", "2024-04", minute_frame("2024-04-02 14:30", 3))
    write(store, "1m", "AAPL", "2024-04", minute_frame("2024-04-02 14:30", 3))
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 3))
    write(store, "1d", "AAPL", "2024", minute_frame("2024-03-04", 3, "1D"))
    write(store, "1h", "EURUSD", "2024", minute_frame("2024-03-04", 3, "1h"))
    # junk that is not a partition: ignored
    root = tmp_path / "bars"
    (root / "timeframe=zz/symbol=AAPL/period=2024").mkdir(parents=True)
    (root / "timeframe=zz/symbol=AAPL/period=2024/data.parquet").write_bytes(b"junk")
    (root / "timeframe=1m/symbol=bad sym/period=2024-03").mkdir(parents=True)
    (root / "timeframe=1m/symbol=bad sym/period=2024-03/data.parquet").write_bytes(b"junk")
    (root / "timeframe=1m/symbol=AAPL/period=2024-05").mkdir(parents=True)  # no file
    (root / "timeframe=1m/symbol=AAPL/period=2024-06").mkdir(parents=True)
    (root / "timeframe=1m/symbol=AAPL/period=2024-06/data.parquet.1.ab.tmp").write_bytes(b"x")
    assert store.partitions() == [
        ("1m", "AAPL", "2024-03"), ("1m", "AAPL", "2024-04"), ("1m", "MSFT", "2024-04"),
        ("1h", "EURUSD", "2024"), ("1d", "AAPL", "2024")]
    assert store.partitions("1m", "AAPL") == [("1m", "AAPL", "2024-03"), ("1m", "AAPL", "2024-04")]
    assert store.partitions(symbol="AAPL") == [
        ("1m", "AAPL", "2024-03"), ("1m", "AAPL", "2024-04"), ("1d", "AAPL", "2024")]
    assert store.partitions("5m") == []
    assert store.symbols() == ["AAPL", "EURUSD", "MSFT"]
    assert store.symbols("1m") == ["AAPL", "MSFT"]
    assert store.timeframes() == ["1m", "1h", "1d"]
    with pytest.raises(ValueError):
        store.partitions("../1m")


def test_read_range_across_periods(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    tf = get_timeframe("1m")
    frame = sim_bars(AAPL, "1m", datetime(2026, 9, 28, tzinfo=UTC),
                     datetime(2026, 11, 4, tzinfo=UTC), True)
    for period in tf.periods_between(frame.index[0], frame.index[-1] + timedelta(minutes=1)):
        lo, hi = tf.period_bounds(period)
        write(store, "1m", "AAPL", period, frame[(frame.index >= lo) & (frame.index < hi)])
    assert [p for _, _, p in store.partitions()] == ["2026-09", "2026-10", "2026-11"]
    start = datetime(2026, 9, 30, 15, 0, tzinfo=UTC)
    end = datetime(2026, 11, 2, 15, 0, tzinfo=UTC)
    got = store.read_range("1m", "AAPL", start, end)
    pd.testing.assert_frame_equal(got, frame[(frame.index >= start) & (frame.index < end)])
    assert got.index.is_monotonic_increasing and got.index[0] == start
    everything = store.read_range("1m", "AAPL", date(2000, 1, 1), date(2100, 1, 1))
    pd.testing.assert_frame_equal(everything, frame)
    assert len(store.read_range("1m", "AAPL", date(2025, 1, 1), date(2025, 2, 1))) == 0
    assert len(store.read_range("1m", "MSFT", start, end)) == 0
    with pytest.raises(ValueError, match="naive"):
        store.read_range("1m", "AAPL", datetime(2026, 10, 1), end)


def test_daily_bars_range_by_session_date(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    frame = sim_bars(SPY, "1d", datetime(2024, 12, 1, tzinfo=UTC),
                     datetime(2025, 2, 1, tzinfo=UTC), True)
    for year in ("2024", "2025"):
        part = frame[frame.index.year == int(year)]
        write(store, "1d", "SPY", year, part)
    got = store.read_range("1d", "SPY", date(2024, 12, 30), date(2025, 1, 3))
    assert [d.date().isoformat() for d in got.index] == ["2024-12-30", "2024-12-31",
                                                         "2025-01-02"]


def test_delete(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 3))
    write(store, "1m", "AAPL", "2024-04", minute_frame("2024-04-02 14:30", 3))
    assert store.delete("1m", "AAPL", "2024-03")
    assert not store.delete("1m", "AAPL", "2024-03")
    assert store.partitions() == [("1m", "AAPL", "2024-04")]
    assert not store.path("1m", "AAPL", "2024-03").parent.exists()
    assert len(store.read("1m", "AAPL", "2024-03")) == 0


# == the schema ================================================================================
INTRADAY_START = datetime(2026, 10, 26, tzinfo=UTC)  # spans DST's end (Nov 1) and the
INTRADAY_END = datetime(2026, 11, 30, 18, 0, tzinfo=UTC)  # half day after Thanksgiving

VALID_CASES = [
    (inst, tf, rth, what)
    for inst, rths, what in [(AAPL, (True, False), "TRADES"), (EURUSD, (False,), "MIDPOINT"),
                             (ES, (True, False), "TRADES")]
    for rth in rths
    for tf in ("1m", "5m", "15m", "1h", "4h", "8h", "1d", "1w", "1mo")
]


@pytest.mark.parametrize("inst, tf, use_rth, what", VALID_CASES,
                         ids=[f"{i.symbol}-{i.sec_type}-{tf}-{'rth' if r else 'all'}"
                              for i, tf, r, _ in VALID_CASES])
def test_simulator_bars_are_valid(inst, tf: str, use_rth: bool, what: str) -> None:
    timeframe = get_timeframe(tf)
    start = (datetime(2025, 6, 1, tzinfo=UTC) if timeframe.is_daily_or_larger
             else INTRADAY_START)
    frame = sim_bars(inst, tf, start, INTRADAY_END, use_rth, what)
    assert len(frame) > 3
    validate_bars(frame, timeframe, inst.profile, use_rth)
    validate_bars(frame, tf, inst.profile.name, use_rth)  # names work too
    for found in (ohlc_violations(frame), duplicate_or_unsorted(frame),
                  session_violations(frame, timeframe, inst.profile, use_rth)):
        assert len(found) == 0 and list(found.columns) == FAILURE_COLUMNS


def test_one_hour_bars_start_at_the_session_open() -> None:
    frame = sim_bars(AAPL, "1h", datetime(2026, 11, 2, tzinfo=UTC),
                     datetime(2026, 11, 3, tzinfo=UTC), True)
    local = frame.index.tz_convert("US/Eastern")
    assert [f"{t:%H:%M}" for t in local] == ["09:30", "10:00", "11:00", "12:00", "13:00",
                                             "14:00", "15:00"]
    validate_bars(frame, "1h", calendars.STOCK, True)
    # the same bars are *not* valid all-hours bars (those start at 04:00, 05:00, ...)
    with pytest.raises(BarValidationError) as info:
        validate_bars(frame.iloc[[0]], "1h", calendars.STOCK, False)
    assert list(info.value.failures["check"]) == ["ts_aligned"]


def test_validated_bars_survive_the_store(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    frame = sim_bars(ES, "5m", datetime(2026, 11, 1, tzinfo=UTC), NOW, False)
    nov = frame[frame.index >= get_timeframe("5m").period_bounds("2026-11")[0]]
    write(store, "5m", "ES_FUT_202612", "2026-11", nov, use_rth=False)
    validate_bars(store.read("5m", "ES_FUT_202612", "2026-11"), "5m", calendars.FUTURE, False)


def _rth_hour_frame() -> pd.DataFrame:
    return sim_bars(AAPL, "1h", datetime(2026, 11, 2, tzinfo=UTC),
                    datetime(2026, 11, 7, tzinfo=UTC), True)


def _set(frame: pd.DataFrame, row: int, col: str, value: float) -> pd.DataFrame:
    out = frame.copy()
    out.iloc[row, out.columns.get_loc(col)] = value
    return out


def _move(frame: pd.DataFrame, row: int, ts: str) -> pd.DataFrame:
    idx = frame.index.to_list()
    idx[row] = pd.Timestamp(ts)
    return frame.set_axis(pd.DatetimeIndex(idx, name="ts"))


CORRUPTIONS = {
    "high below open": (lambda f: _set(f, 3, "high", f["open"].iloc[3] - 0.5),
                        "ohlc_consistent", ohlc_violations, [3]),
    "high below close": (lambda f: _set(f, 4, "high", f["close"].iloc[4] - 0.01),
                         "ohlc_consistent", ohlc_violations, [4]),
    "low above open": (lambda f: _set(f, 5, "low", f["open"].iloc[5] + 0.01),
                       "ohlc_consistent", ohlc_violations, [5]),
    "low above close": (lambda f: _set(f, 6, "low", f["close"].iloc[6] + 0.01),
                        "ohlc_consistent", ohlc_violations, [6]),
    "zero price": (lambda f: _set(_set(f, 7, "low", 0.0), 7, "open", 0.0),
                   "price_positive", ohlc_violations, [7]),
    "negative price": (lambda f: _set(f, 8, "close", -1.0), "price_positive", ohlc_violations,
                       [8]),
    "missing close": (lambda f: _set(f, 9, "close", np.nan), "price_positive", ohlc_violations,
                      [9]),
    "negative volume": (lambda f: _set(f, 10, "volume", -5.0), "volume_non_negative",
                        ohlc_violations, [10]),
    "negative wap": (lambda f: _set(f, 11, "wap", -1.0), "wap_non_negative", ohlc_violations,
                     [11]),
    "negative count": (lambda f: _set(f, 12, "bar_count", -1), "bar_count_non_negative",
                       ohlc_violations, [12]),
    "duplicate bar": (lambda f: pd.concat([f.iloc[:14], f.iloc[[13]], f.iloc[14:]]),
                      "ts_unique", duplicate_or_unsorted, [13, 14]),
    "unsorted": (lambda f: f.iloc[[0, 1, 3, 2, 4, 5]], "ts_sorted", duplicate_or_unsorted, [3]),
    "misaligned": (lambda f: _move(f, 2, "2026-11-02 16:30:00+00:00"), "ts_aligned",
                   "session", [2]),
    "sub-second": (lambda f: _move(f, 1, "2026-11-02 15:00:00.5+00:00"), "ts_aligned",
                   "session", [1]),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_rule_catches_its_violation_and_reports_the_rows(name: str) -> None:
    mutate, check, finder, rows = CORRUPTIONS[name]
    good = _rth_hour_frame()
    bad = mutate(good)
    before = bad.copy()
    expected_ts = [bad.index[r] for r in rows]
    with pytest.raises(BarValidationError) as info:
        validate_bars(bad, "1h", calendars.STOCK, True)
    failures = info.value.failures
    assert list(failures.columns) == FAILURE_COLUMNS and failures.index.name == "ts"
    hit = failures[failures["check"] == check]
    assert list(hit.index) == expected_ts, failures
    assert check in str(info.value)
    if finder == "session":
        found = session_violations(bad, "1h", calendars.STOCK, True)
    else:
        found = finder(bad)
    found = found[found["check"] == check]
    assert list(found.index) == expected_ts
    # the offending rows carry the bar's values ...
    pos = rows[0]
    for col in ("open", "high", "low", "close", "volume"):
        want, got = bad[col].iloc[pos], found[col].iloc[0]
        assert (np.isnan(want) and np.isnan(got)) or want == got
    # ... and nothing was "corrected"
    pd.testing.assert_frame_equal(bad, before)


#: Bars IB served where the calendar has no session (issue 13: IB's data is the truth).
OUTSIDE_SESSIONS = {
    "after the close": (lambda f: _move(f, 6, "2026-11-02 21:00:00+00:00"), [6]),
    "on a weekend": (lambda f: pd.concat([f, _move(f.iloc[[0]], 0,
                                                   "2026-11-07 15:00:00+00:00")]),
                     [len(_rth_hour_frame())]),
    "off the grid, after the close": (lambda f: _move(f, 6, "2026-11-02 21:20:00+00:00"), [6]),
}


@pytest.mark.parametrize("name", list(OUTSIDE_SESSIONS))
def test_bars_outside_sessions_are_valid_and_listed(name: str) -> None:
    """A bar outside every session never fails validation (so never a load); it is
    listed by outside_session_bars with its values, and by no rule."""
    mutate, rows = OUTSIDE_SESSIONS[name]
    bad = mutate(_rth_hour_frame())
    validate_bars(bad, "1h", calendars.STOCK, True)
    assert len(session_violations(bad, "1h", calendars.STOCK, True)) == 0
    found = outside_session_bars(bad, "1h", calendars.STOCK, True)
    assert list(found["check"]) == ["in_session"] * len(rows)
    assert list(found.index) == [bad.index[r] for r in rows]
    assert found["close"].iloc[0] == bad["close"].iloc[rows[0]]
    assert len(outside_session_bars(_rth_hour_frame(), "1h", calendars.STOCK, True)) == 0


def test_fx_without_volume_is_valid_but_negative_volume_is_not() -> None:
    frame = sim_bars(EURUSD, "5m", datetime(2026, 11, 2, tzinfo=UTC),
                     datetime(2026, 11, 4, tzinfo=UTC), False, what="MIDPOINT")
    assert frame["volume"].isna().all() and frame["wap"].isna().all()
    validate_bars(frame, "5m", calendars.FX, False)
    with pytest.raises(BarValidationError, match="volume_non_negative"):
        validate_bars(_set(frame, 0, "volume", -1.0), "5m", calendars.FX, False)


def test_daily_bars_must_be_midnight_utc_of_a_session_date() -> None:
    frame = sim_bars(SPY, "1d", datetime(2026, 11, 16, tzinfo=UTC), NOW, True)
    validate_bars(frame, "1d", calendars.STOCK, True)
    shifted = frame.set_axis(frame.index + pd.Timedelta(hours=5))
    found = session_violations(shifted, "1d", calendars.STOCK, True)
    assert set(found["check"]) == {"ts_aligned"} and len(found) == len(frame)
    thanksgiving = pd.concat([frame, _move(frame.iloc[[0]], 0, "2026-11-26 00:00:00+00:00")])
    # a daily bar dated on a day without a session is listed, not refused (issue 13)
    validate_bars(thanksgiving.sort_index(), "1d", calendars.STOCK, True)
    found = outside_session_bars(thanksgiving.sort_index(), "1d", calendars.STOCK, True)
    assert list(found["check"]) == ["in_session"]
    assert found.index[0] == pd.Timestamp("2026-11-26", tz="UTC")


def test_structural_problems_are_reported() -> None:
    frame = _rth_hour_frame()
    eastern = frame.set_axis(frame.index.tz_convert("US/Eastern"))
    with pytest.raises(BarValidationError, match="ts_utc"):
        validate_bars(eastern, "1h", calendars.STOCK, True)
    with pytest.raises(BarValidationError) as info:
        validate_bars(frame.assign(bar_count=frame["bar_count"].astype(float), extra=1)
                      .drop(columns="wap"), "1h", calendars.STOCK, True)
    checks = set(info.value.failures["check"])
    assert {"column_in_schema[extra]", "column_in_dataframe[wap]"} <= checks
    assert any(c.startswith("dtype('int64')") for c in checks)
    assert info.value.failures.index.isna().all()
    validate_bars(empty_bars(), "1h", calendars.STOCK, True)


def test_several_failures_are_collected_at_once() -> None:
    bad = _set(_set(_rth_hour_frame(), 1, "high", 1.0), 2, "volume", -1.0)
    bad = _move(bad, 4, "2026-11-02 03:00:00+00:00")
    with pytest.raises(BarValidationError) as info:
        validate_bars(bad, "1h", calendars.STOCK, True)
    checks = info.value.failures["check"].tolist()
    assert {"ohlc_consistent", "volume_non_negative", "ts_sorted"} <= set(checks)
    assert "in_session" not in checks  # the moved bar is outside the sessions: listed only
    assert len(outside_session_bars(bad, "1h", calendars.STOCK, True)) == 1


finite = st.floats(min_value=0.01, max_value=1000, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=20))
def test_ohlc_rule_matches_its_definition(rows) -> None:
    frame = minute_frame("2024-03-04 14:30", len(rows))
    arr = np.array(rows)
    frame[["open", "high", "low", "close"]] = arr
    o, h, lo, c = arr.T
    expected = ~((lo <= np.minimum(o, c)) & (np.maximum(o, c) <= h))
    found = ohlc_violations(frame)
    assert list(found.index) == list(frame.index[expected])
    assert set(found["check"]) <= {"ohlc_consistent"}


# == the DuckDB catalog =========================================================================
def _fill(store: BarStore) -> dict[str, pd.DataFrame]:
    frames = {
        "AAPL": sim_bars(AAPL, "1m", datetime(2026, 10, 29, tzinfo=UTC),
                         datetime(2026, 11, 3, tzinfo=UTC), True),
        "SPY": sim_bars(SPY, "1m", datetime(2026, 11, 2, tzinfo=UTC),
                        datetime(2026, 11, 3, tzinfo=UTC), True),
    }
    tf = get_timeframe("1m")
    for sym, frame in frames.items():
        for period in tf.periods_between(frame.index[0], frame.index[-1] + timedelta(minutes=1)):
            lo, hi = tf.period_bounds(period)
            write(store, "1m", sym, period, frame[(frame.index >= lo) & (frame.index < hi)])
    daily = sim_bars(AAPL, "1d", datetime(2026, 11, 1, tzinfo=UTC), NOW, True)
    write(store, "1d", "AAPL", "2026", daily)
    frames["AAPL_1d"] = daily
    return frames


def _describe(con: duckdb.DuckDBPyConnection, view: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in con.execute(f"DESCRIBE {view}").fetchall()]


def test_catalog_views_are_typed(tmp_path: Path) -> None:
    _fill(BarStore(tmp_path))
    assert cat.refresh_catalog(tmp_path)
    con = cat.connect_readonly(tmp_path)
    try:
        assert _describe(con, "bars") == cat.BARS_COLUMNS
        per_tf = [c for c in cat.BARS_COLUMNS if c[0] != "timeframe"]
        views = {r[0] for r in con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        # enabled timeframes (default 1m,5m,15m,1h,1d) plus stored ones
        assert views == {"bars", "coverage", "bars_1m", "bars_5m", "bars_15m", "bars_1h",
                         "bars_1d"}
        for view in ("bars_1m", "bars_5m", "bars_1d"):
            assert _describe(con, view) == per_tf
        assert _describe(con, "coverage") == [
            ("symbol", "VARCHAR"), ("timeframe", "VARCHAR"),
            ("first_bar", "TIMESTAMP WITH TIME ZONE"), ("last_bar", "TIMESTAMP WITH TIME ZONE"),
            ("rows", "BIGINT"), ("partitions", "BIGINT")]
        ts = con.execute("SELECT ts FROM bars_1m ORDER BY ts LIMIT 1").fetchone()[0]
        assert ts == datetime(2026, 10, 29, 13, 30, tzinfo=UTC)
    finally:
        con.close()
    # the in-memory views of `query` are the same
    res = cat.run_query(tmp_path, "DESCRIBE bars")
    assert [(r[0], r[1]) for r in res.rows] == cat.BARS_COLUMNS


def test_coverage_numbers(tmp_path: Path) -> None:
    frames = _fill(BarStore(tmp_path))
    res = cat.run_query(tmp_path, "SELECT * FROM coverage ORDER BY symbol, timeframe")
    got = {(r[0], r[1]): r[2:] for r in res.rows}
    aapl, spy, daily = frames["AAPL"], frames["SPY"], frames["AAPL_1d"]
    assert got == {
        ("AAPL", "1d"): (daily.index[0].to_pydatetime(), daily.index[-1].to_pydatetime(),
                         len(daily), 1),
        ("AAPL", "1m"): (aapl.index[0].to_pydatetime(), aapl.index[-1].to_pydatetime(),
                         len(aapl), 2),
        ("SPY", "1m"): (spy.index[0].to_pydatetime(), spy.index[-1].to_pydatetime(), len(spy),
                        1),
    }
    # `rows` is usable unquoted
    assert cat.run_query(tmp_path, "SELECT sum(rows) FROM coverage").rows == [
        (len(aapl) + len(spy) + len(daily),)]


def test_empty_store_works(tmp_path: Path) -> None:
    data_dir = tmp_path / "never-written"
    assert cat.run_query(data_dir, "SELECT count(*) FROM bars").rows == [(0,)]
    assert cat.run_query(data_dir, "SELECT * FROM coverage").rows == []
    assert [(r[0], r[1]) for r in cat.run_query(data_dir, "DESCRIBE bars_1m").rows] == [
        c for c in cat.BARS_COLUMNS if c[0] != "timeframe"]
    assert cat.refresh_catalog(data_dir)
    con = cat.connect_readonly(data_dir)
    try:
        assert _describe(con, "bars") == cat.BARS_COLUMNS
        assert con.execute("SELECT count(*) FROM bars_1h").fetchone() == (0,)
    finally:
        con.close()


def test_new_files_are_visible_without_refresh(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 10))
    assert cat.refresh_catalog(tmp_path)
    assert not cat.refresh_catalog(tmp_path)  # unchanged: not rewritten
    write(store, "1m", "MSFT", "2024-03", minute_frame("2024-03-04 14:30", 7))
    write(store, "1m", "AAPL", "2024-04", minute_frame("2024-04-01 14:30", 5))
    write(store, "1h", "AAPL", "2024", minute_frame("2024-03-04 14:00", 3, "1h"))
    con = cat.connect_readonly(tmp_path, refresh=False)
    try:
        assert con.execute("SELECT symbol, count(*) FROM bars_1m GROUP BY ALL ORDER BY 1"
                           ).fetchall() == [("AAPL", 15), ("MSFT", 7)]
        # a new timeframe shows up in `bars` at once ...
        assert con.execute("SELECT count(*) FROM bars WHERE timeframe = '1h'").fetchone() == (3,)
    finally:
        con.close()
    # ... and gets its own view at the next refresh (the set of timeframes changed); the
    # caller passes the enabled timeframes (settings.timeframes: KTRDR_TIMEFRAMES)
    assert cat.refresh_catalog(tmp_path, timeframes=["1m"])
    con = cat.connect_readonly(tmp_path, refresh=False)
    try:
        views = {r[0] for r in con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert views == {"bars", "coverage", "bars_1m", "bars_1h"}
        assert con.execute("SELECT count(*) FROM bars_1h").fetchone() == (3,)
    finally:
        con.close()


def test_symbol_bars_equals_the_filtered_view_and_reads_only_that_symbol(
        tmp_path: Path) -> None:
    frames = _fill(BarStore(tmp_path))
    write(BarStore(tmp_path), "1m", "MSFT", "2026-11", minute_frame("2026-11-02 14:30", 9))
    cols = "symbol, ts, open, high, low, close, volume, wap, bar_count, period"
    by_view = cat.run_query(tmp_path, f"SELECT {cols} FROM bars_1m WHERE symbol = 'AAPL' "
                                      "ORDER BY ts")
    by_macro = cat.run_query(tmp_path, "SELECT * FROM symbol_bars('1m', 'AAPL') ORDER BY ts")
    assert by_macro.columns == by_view.columns
    assert by_macro.types == by_view.types
    assert by_macro.rows == by_view.rows and len(by_macro.rows) == len(frames["AAPL"])
    # it lists AAPL's two monthly files only, not the four files of the timeframe
    con = cat.memory_connection(tmp_path)
    try:
        plans = {sql: con.execute("EXPLAIN ANALYZE " + sql).fetchall()[0][1] for sql in (
            "SELECT count(*) FROM symbol_bars('1m', 'AAPL')",
            "SELECT count(*) FROM bars_1m WHERE symbol = 'AAPL'")}
    finally:
        con.close()

    def listed(plan: str) -> int:
        """Files the scan considered: all of the glob's when it pruned some by path."""
        pruned = re.search(r"Scanning Files:\s*\d+/(\d+)", plan)
        read = re.search(r"Total Files Read:\s*(\d+)", plan)
        assert read, plan
        return int(pruned.group(1) if pruned else read.group(1))

    assert [listed(plan) for plan in plans.values()] == [2, 4], plans
    # the same macro is in the catalog file, for other tools
    cat.refresh_catalog(tmp_path)
    con = cat.connect_readonly(tmp_path, refresh=False)
    try:
        assert con.execute("SELECT count(*) FROM symbol_bars('1d', 'AAPL')").fetchone() == (
            len(frames["AAPL_1d"]),)
    finally:
        con.close()


@pytest.mark.parametrize("args, message", [
    ("'1x', 'AAPL'", r"unknown timeframe '1x'; allowed: .*\b1m\b"),
    ("NULL, 'AAPL'", r"unknown timeframe NULL; allowed"),
    ("'1m', '../AAPL'", r"invalid symbol '\.\./AAPL'; expected a storage key"),
    ("'1m', 'A/B'", r"invalid symbol 'A/B'"),
    ("'1m', 'AA..PL'", r"invalid symbol 'AA\.\.PL'"),
    ("'1m', 'aapl'", r"invalid symbol 'aapl'"),
    ("'1m', 'MSFT'", r"no 1m bars stored for symbol 'MSFT'; symbols with 1m bars: AAPL, SPY"),
    ("'5m', 'AAPL'", r"no 5m bars stored for symbol 'AAPL'; symbols with 5m bars: none"),
])
def test_symbol_bars_refuses_bad_arguments_clearly(tmp_path: Path, args: str,
                                                   message: str) -> None:
    _fill(BarStore(tmp_path))
    with pytest.raises(cat.QueryError, match=message):
        cat.run_query(tmp_path, f"SELECT count(*) FROM symbol_bars({args})")


def test_queries_do_not_wait_for_a_writer_holding_the_catalog(tmp_path: Path,
                                                              monkeypatch) -> None:
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 10))
    cat.refresh_catalog(tmp_path)
    with DuckDBLockHolder(tmp_path / cat.CATALOG_FILE) as holder:
        assert cat.run_query(tmp_path, "SELECT count(*) FROM bars_1m").rows == [(10,)]
        assert "10" in cat.query(tmp_path, "SELECT count(*) AS n FROM bars", "csv")
        # the holder lets go only when told: the queries ran while it held the catalog
        assert holder.holding()
        with pytest.raises(cat.CatalogLockedError, match=r"catalog\.duckdb"):
            cat.refresh_catalog(tmp_path, force=True, timeout_s=0.3)
        assert holder.holding()
        # with the default timeout the refresh waits for the other process to let go: it
        # is told to at the refresh's first wait for the lock
        write(store, "1h", "AAPL", "2024", minute_frame("2024-03-04 14:00", 2, "1h"))
        waits: list[float] = []

        def sleep(seconds: float) -> None:
            if not waits:
                holder.release()  # returns once the holder has closed the file and exited
            waits.append(seconds)
            time.sleep(seconds)

        clock = SimpleNamespace(monotonic=time.monotonic, sleep=sleep)
        monkeypatch.setattr(locking, "time", clock)  # the catalog waits through locking
        assert cat.refresh_catalog(tmp_path)
        assert waits and not holder.holding()  # it found the file held, waited, then wrote
    con = cat.connect_readonly(tmp_path, refresh=False)
    try:
        assert con.execute("SELECT count(*) FROM bars_1h").fetchone() == (2,)
    finally:
        con.close()


@pytest.mark.parametrize("sql", [
    "INSERT INTO bars VALUES (1)",
    "CREATE TABLE t AS SELECT 1",
    "CREATE VIEW v AS SELECT 1",
    "DROP VIEW bars",
    "DROP MACRO TABLE symbol_bars",
    "CREATE MACRO m(x) AS x + 1",
    "COPY (SELECT 1) TO '{out}'",
    "COPY bars TO '{out}' (FORMAT parquet)",
    "EXPORT DATABASE '{dir}'",
    "ATTACH '{dir}/other.duckdb' AS other",
    "SELECT 1; SELECT 2",
    "SELECT 1; DROP VIEW bars",
    "SET threads = 1",
    "PRAGMA threads = 1",
    "INSTALL httpfs",
    "LOAD parquet",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}'",
    "EXPLAIN CREATE TABLE t AS SELECT 1",
    "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
    "SELECT * FROM query('CREATE TABLE t AS SELECT 1')",
    "",
    "   ;  ",
    "SELEC 1",
])
def test_non_read_statements_are_rejected(tmp_path: Path, sql: str) -> None:
    out = tmp_path / "out.csv"
    with pytest.raises(cat.QueryError):
        cat.query(tmp_path, sql.format(out=out, dir=tmp_path), "table")
    assert not out.exists() and not (tmp_path / "other.duckdb").exists()
    assert not (tmp_path / "schema.sql").exists()


@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM bars",
    "  -- a comment\n  select 1 AS one;",
    "WITH x AS (SELECT * FROM bars_1m) SELECT count(*) FROM x",
    "FROM coverage",
    "DESCRIBE bars",
    "SHOW TABLES",
    "SUMMARIZE bars_1m",
    "PRAGMA table_info('bars')",
    "EXPLAIN SELECT * FROM bars",
    "EXPLAIN ANALYZE SELECT count(*) FROM bars",
    "VALUES (1, 'a')",
])
def test_read_statements_are_allowed(tmp_path: Path, sql: str) -> None:
    write(BarStore(tmp_path), "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 3))
    assert cat.query(tmp_path, sql, "table")


def test_greeks_database_is_attached_read_only(tmp_path: Path) -> None:
    greeks = tmp_path / cat.GREEKS_FILE
    con = duckdb.connect(str(greeks))
    con.execute("CREATE TABLE greeks (symbol VARCHAR, delta DOUBLE)")
    con.execute("INSERT INTO greeks VALUES ('AAPL', 0.5)")
    con.close()
    assert cat.run_query(tmp_path, "SELECT * FROM greeks.greeks").rows == [("AAPL", 0.5)]
    with pytest.raises(cat.QueryError):
        cat.run_query(tmp_path, "DELETE FROM greeks.greeks")
    # while its writer holds it, queries still run (without the greeks)
    with DuckDBLockHolder(greeks) as holder:
        assert cat.run_query(tmp_path, "SELECT count(*) FROM bars").rows == [(0,)]
        assert holder.holding()  # it ran while the writer held the file


ROWS = [
    ("AAPL", datetime(2024, 3, 4, 14, 30, tzinfo=UTC), 187.5, float("nan"), 12, None,
     date(2024, 3, 4), True),
    ('say "hi", ok', datetime(2024, 3, 4, 14, 31, tzinfo=UTC), -0.25, 1e6, 3, "x\ny",
     date(2024, 3, 5), False),
]
COLUMNS = ["symbol", "ts", "close", "volume", "bar_count", "note", "day", "flag"]


def test_format_table() -> None:
    text = cat.format_result(ROWS, COLUMNS, "table")
    lines = text.splitlines()
    assert lines[0].split("|")[0].strip() == "symbol"
    assert set(lines[1]) <= {"-", "+"} and lines[1].count("+") == len(COLUMNS) - 1
    assert lines[-1] == "(2 rows)"
    # columns line up: every separator sits at the same offset on every line
    bars = [i for i, ch in enumerate(lines[0]) if ch == "|"]
    assert [i for i, ch in enumerate(lines[1]) if ch == "+"] == bars
    for line in lines[2:-1]:
        assert [i for i, ch in enumerate(line) if ch == "|"][:len(bars)] == bars
    assert "2024-03-04 14:30:00+00:00" in text and "NaN" in text
    # numbers are right-aligned
    row1 = lines[2].split("|")
    assert row1[2].endswith("187.5 ") and row1[4].strip() == "12"
    assert cat.format_result([], ["a"], "table").splitlines()[-1] == "(0 rows)"
    assert cat.format_result([(1,)], ["a"], "table").splitlines()[-1] == "(1 row)"


def test_format_csv() -> None:
    text = cat.format_result(ROWS, COLUMNS, "csv")
    # "\n" line ends (no CR: shell pipelines see clean lines)
    assert text.startswith("symbol,ts,close,volume,bar_count,note,day,flag\n")
    assert "\r" not in text and text.endswith("\n")
    assert text.count("\n") == 4  # header and two rows, plus the quoted field's own "\n"
    parsed = list(csv.reader(io.StringIO(text, newline="")))
    assert parsed[0] == COLUMNS
    assert parsed[1] == ["AAPL", "2024-03-04T14:30:00+00:00", "187.5", "NaN", "12", "",
                         "2024-03-04", "true"]
    assert parsed[2][0] == 'say "hi", ok' and parsed[2][5] == "x\ny"


def test_format_json() -> None:
    data = json.loads(cat.format_result(ROWS, COLUMNS, "json"))
    assert data[0] == {"symbol": "AAPL", "ts": "2024-03-04T14:30:00+00:00", "close": 187.5,
                       "volume": None, "bar_count": 12, "note": None, "day": "2024-03-04",
                       "flag": True}
    assert data[1]["note"] == "x\ny" and data[1]["volume"] == 1e6
    assert json.loads(cat.format_result([], COLUMNS, "json")) == []
    with pytest.raises(ValueError, match="format"):
        cat.format_result(ROWS, COLUMNS, "xml")


def test_query_formats_end_to_end(tmp_path: Path) -> None:
    write(BarStore(tmp_path), "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 3))
    sql = "SELECT symbol, ts, bar_count FROM bars_1m ORDER BY ts LIMIT 2"
    data = json.loads(cat.query(tmp_path, sql, "json"))
    assert data[0]["ts"] == "2024-03-04T14:30:00+00:00" and data[0]["symbol"] == "AAPL"
    assert cat.query(tmp_path, sql, "csv").splitlines()[1].startswith(
        "AAPL,2024-03-04T14:30:00+00:00,")
    assert "(2 rows)" in cat.query(tmp_path, sql, "table")
    with pytest.raises(ValueError, match="format"):
        cat.query(tmp_path, sql, "yaml")
    with pytest.raises(cat.QueryError, match="nope"):
        cat.query(tmp_path, "SELECT * FROM nope", "table")


def test_greeks_tables_are_reachable_qualified_and_not(tmp_path):
    import duckdb

    from ktrdr_pipeline.store.catalog import run_query

    con = duckdb.connect(str(tmp_path / "greeks.duckdb"))
    con.execute("CREATE TABLE portfolio_greeks AS SELECT 1 AS delta")
    con.close()
    assert run_query(tmp_path, "SELECT delta FROM greeks.portfolio_greeks").rows == [(1,)]
    assert run_query(tmp_path, "SELECT delta FROM portfolio_greeks").rows == [(1,)]
    assert run_query(tmp_path, "SELECT count(*) FROM bars").rows == [(0,)]


# == sql reads only the store ===================================================================
def _outside_queries(tmp_path: Path) -> list[str]:
    bars = (tmp_path / "bars").resolve()
    return [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/shadow')",
        "SELECT * FROM glob('/root/**')",
        f"SELECT * FROM glob('{tmp_path.resolve()}/**')",
        f"SELECT * FROM read_text('{tmp_path.resolve()}/secret.txt')",
        f"SELECT * FROM read_text('{bars}/../secret.txt')",
        f"SELECT count(*) FROM read_parquet('{tmp_path.resolve()}/elsewhere.parquet')",
        "SELECT * FROM read_csv('https://example.com/x.csv')",
    ]


def test_sql_reads_only_the_store(tmp_path: Path) -> None:
    frames = _fill(BarStore(tmp_path))
    (tmp_path / "secret.txt").write_text("top secret\n")
    duckdb.sql(f"COPY (SELECT 1 AS x) TO '{tmp_path / 'elsewhere.parquet'}' (FORMAT parquet)")
    con = duckdb.connect(str(tmp_path / cat.GREEKS_FILE))
    con.execute("CREATE TABLE portfolio_greeks AS SELECT 'AAPL' AS symbol, 0.5 AS delta")
    con.close()
    for sql in _outside_queries(tmp_path):
        with pytest.raises(cat.QueryError, match=r"^queries may read only the store: the bar "
                                                 r"files under .*; DuckDB refused: "):
            cat.run_query(tmp_path, sql)
    for sql in ("SET enable_external_access = true", "RESET enable_external_access",
                "SET lock_configuration = false", "SET allowed_directories = ['/']"):
        with pytest.raises(cat.QueryError, match="SET and RESET are not allowed.*may read "
                                                 "only the store"):
            cat.run_query(tmp_path, sql)
    # ... and even on the connection itself, the configuration is locked
    con = cat.memory_connection(tmp_path)
    try:
        with pytest.raises(duckdb.Error, match="configuration has been locked"):
            con.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.PermissionException):
            con.execute("SELECT * FROM read_text('/etc/passwd')")
    finally:
        con.close()
    # every view, the macro and the Greeks tables still work
    n_1m = len(frames["AAPL"]) + len(frames["SPY"])
    assert cat.run_query(tmp_path, "SELECT count(*) FROM bars").rows == [
        (n_1m + len(frames["AAPL_1d"]),)]
    assert cat.run_query(tmp_path, "SELECT count(*) FROM bars_1m").rows == [(n_1m,)]
    assert cat.run_query(tmp_path, "SELECT count(*) FROM bars_1d").rows == [
        (len(frames["AAPL_1d"]),)]
    assert cat.run_query(tmp_path, "SELECT sum(rows) FROM coverage").rows == [
        (n_1m + len(frames["AAPL_1d"]),)]
    assert cat.run_query(tmp_path, "SELECT count(*) FROM symbol_bars('1m', 'SPY')").rows == [
        (len(frames["SPY"]),)]
    assert cat.run_query(tmp_path, "SELECT delta FROM greeks.portfolio_greeks").rows == [(0.5,)]
    assert cat.run_query(tmp_path, "SELECT delta FROM portfolio_greeks").rows == [(0.5,)]
    with pytest.raises(cat.QueryError, match="no 1m bars stored for symbol 'MSFT'"):
        cat.run_query(tmp_path, "SELECT count(*) FROM symbol_bars('1m', 'MSFT')")


def test_sql_command_refuses_files_outside_the_store(tmp_path: Path) -> None:
    write(BarStore(tmp_path), "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 3))
    env = {**subprocess_env(), "KTRDR_DATA_DIR": str(tmp_path)}

    def sql(query: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", "sql", query],
                              env=env, capture_output=True, text=True, timeout=120)

    refused = sql("select * from read_csv('/etc/passwd')")
    assert refused.returncode != 0 and "root:" not in refused.stdout
    assert "queries may read only the store" in refused.stderr
    refused = sql("SET enable_external_access = true")
    assert refused.returncode != 0 and "may read only the store" in refused.stderr
    ok = sql("select count(*) AS n from symbol_bars('1m', 'AAPL')")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split("\n")[2].strip() == "3"
