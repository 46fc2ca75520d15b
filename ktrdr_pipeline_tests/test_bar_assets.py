"""Bar assets materialized with Dagster against the simulator; gap-aware loading."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.asset_check_state import AssetCheckState

from ktrdr_pipeline.defs.bars.assets import build_bar_asset
from ktrdr_pipeline.defs.bars.checks import build_checks
from ktrdr_pipeline.defs.resources import KtrdrSettings
from ktrdr_pipeline.domain.bars import FetchState
from ktrdr_pipeline.domain.timeframes import get_timeframe
from ktrdr_pipeline.simulator.market import C, H, L, O, T, V
from ktrdr_pipeline.simulator.server import GatewayThread
from ktrdr_pipeline.store.parquet import BarStore
from ktrdr_pipeline.universe import load_universe

from .conftest import MARKET_OPEN, read_audit


@pytest.fixture
def env(tmp_path, audit_path):
    with (GatewayThread(clock=MARKET_OPEN, latency="none", audit_log=audit_path) as gw,
          dg.instance_for_test() as instance):
        instance.add_dynamic_partitions("symbols", ["AAPL", "EURUSD"])
        resources = {"ktrdr": KtrdrSettings(ib_port=gw.port, data_dir=str(tmp_path / "data"),
                                            ib_client_id=50)}
        yield gw, instance, resources, tmp_path / "data", audit_path


def _materialize(tf_name: str, symbol: str, period: str, env, mode: str = "fill"):
    gw, instance, resources, _, _ = env
    tf = get_timeframe(tf_name)
    asset = build_bar_asset(tf)
    result = dg.materialize(
        [asset, *build_checks(tf)], instance=instance, resources=resources,
        partition_key=dg.MultiPartitionKey({"symbol": symbol, "period": period}),
        run_config={"ops": {f"bars_{tf_name}": {"config": {"mode": mode}}}},
    )
    assert result.success
    [mat] = result.asset_materializations_for_node(f"bars_{tf_name}")
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    return mat.metadata, checks


def _requests(audit_path: Path) -> list[dict]:
    return [e for e in read_audit(audit_path) if e["message"] == "reqHistoricalData"]


def test_stored_bars_equal_the_simulator_bar_for_bar(env):
    gw, _, _, data_dir, _ = env
    meta, checks = _materialize("1m", "AAPL", "2026-10", env)
    assert meta["rows"].value == 22 * 390
    assert all(c.passed for c in checks.values()), {k: c.metadata for k, c in checks.items()}
    stored = BarStore(data_dir).read("1m", "AAPL", "2026-10")
    inst = gw.server.universe.instruments[265598]
    start, end = get_timeframe("1m").period_bounds("2026-10")
    expected = gw.server.market.bars(inst, "1 min", start, end, True, MARKET_OPEN)
    assert len(stored) == len(expected)
    np.testing.assert_array_equal(stored.index.asi8 // 10**9, expected[:, T].astype(np.int64))
    for col, k in (("open", O), ("high", H), ("low", L), ("close", C), ("volume", V)):
        np.testing.assert_array_equal(stored[col].to_numpy(), expected[:, k])


def test_complete_partition_makes_zero_requests_and_inner_gap_fetches_only_it(env):
    gw, _, _, data_dir, audit_path = env
    _materialize("1h", "AAPL", "2025", env)
    before = len(_requests(audit_path))
    meta, _ = _materialize("1h", "AAPL", "2025", env)
    assert meta["ib_requests"].value == 0
    assert len(_requests(audit_path)) == before  # asserted from the gateway's side

    store = BarStore(data_dir)
    frame = store.read("1h", "AAPL", "2025")
    hole = (frame.index >= pd.Timestamp("2025-06-10", tz=UTC)) & (
        frame.index < pd.Timestamp("2025-06-13", tz=UTC))
    meta_before = store.read_meta("1h", "AAPL", "2025")
    store.write("1h", "AAPL", "2025", frame[~hole], use_rth=True, what_to_show="TRADES",
                fetch=FetchState(con_id=meta_before.con_id, fetched_at=meta_before.fetched_at,
                                 partial_from=meta_before.partial_from))
    meta, checks = _materialize("1h", "AAPL", "2025", env)
    new = _requests(audit_path)[before:]
    assert meta["gaps_found"].value == 1 and meta["bars_fetched"].value == hole.sum()
    assert len(new) == 1 and new[0]["duration"] == "3 D"
    assert store.read("1h", "AAPL", "2025").equals(frame)
    assert checks["calendar_gaps"].passed


def test_fx_all_hours_and_daily_bars(env):
    _, _, _, data_dir, _ = env
    meta, checks = _materialize("1d", "EURUSD", "2026", env)
    assert meta["what_to_show"].value == "MIDPOINT" and meta["use_rth"].value is False
    frame = BarStore(data_dir).read("1d", "EURUSD", "2026")
    assert frame["volume"].isna().all()
    assert all(t == t.normalize() for t in frame.index)
    assert checks["ohlc_valid"].passed


def test_bad_bars_fail_the_blocking_check_with_the_rows(env):
    _, _, _, data_dir, _ = env
    _materialize("1h", "AAPL", "2025", env)
    path = BarStore(data_dir).path("1h", "AAPL", "2025")
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    df = table.to_pandas()
    df.loc[5, "high"] = df.loc[5, "low"] - 1.0  # a corrupt bar
    pq.write_table(type(table).from_pandas(df, schema=table.schema, preserve_index=False), path)
    gw, instance, resources, _, _ = env
    tf = get_timeframe("1h")
    asset = build_bar_asset(tf)
    result = dg.materialize(
        [asset, *build_checks(tf)], instance=instance, resources=resources,
        partition_key=dg.MultiPartitionKey({"symbol": "AAPL", "period": "2025"}),
        raise_on_error=False,
    )  # the partition is complete: nothing is fetched or rewritten, the checks read it
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["ohlc_valid"].passed
    assert checks["ohlc_valid"].metadata["violations"].value >= 1
    assert "offending_rows" in checks["ohlc_valid"].metadata
    assert checks["unique_sorted_in_session"].passed
    assert not result.success  # a blocking check failed
    frame = BarStore(data_dir).read("1h", "AAPL", "2025")
    assert frame.iloc[5]["high"] < frame.iloc[5]["low"]  # never silently "corrected"


def _cli(*args, data_dir: Path, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "KTRDR_DATA_DIR": str(data_dir), "IB_PORT": str(port),
           "IB_CLIENT_ID": "60"}
    return subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_load_command_json_summary_and_sql(env):
    gw, _, _, data_dir, _ = env
    first = _cli("load", "MSFT", "--timeframe", "1h", "--start", "2026-11-02", "--end",
                 "2026-11-06", "--json", data_dir=data_dir, port=gw.port)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    for key in ("status", "fetched_bars", "cached_before", "gaps_analyzed", "segments_fetched",
                "ib_requests_made", "bars_written"):
        assert key in summary
    assert summary["status"] == "ok" and summary["fetched_bars"] == 35
    assert summary["cached_before"] == 0
    again = json.loads(_cli("load", "MSFT", "--timeframe", "1h", "--start", "2026-11-02",
                            "--end", "2026-11-06", "--json", data_dir=data_dir,
                            port=gw.port).stdout)
    assert again["ib_requests_made"] == 0 and again["cached_before"] == 35
    sql = _cli("sql", "SELECT symbol, count(*) AS n FROM bars_1h GROUP BY symbol",
               "--format", "json", data_dir=data_dir, port=gw.port)
    assert json.loads(sql.stdout) == [{"symbol": "MSFT", "n": 35}]
    bad = _cli("load", "MSFT", "--timeframe", "7m", data_dir=data_dir, port=gw.port)
    assert bad.returncode == 2 and "7m" in bad.stderr
    backwards = _cli("load", "MSFT", "--timeframe", "1h", "--start", "2026-11-06", "--end",
                     "2026-11-02", data_dir=data_dir, port=gw.port)
    assert backwards.returncode == 2 and "after" in backwards.stderr
    unknown = _cli("load", "NOPE", "--timeframe", "1h", data_dir=data_dir, port=gw.port)
    assert unknown.returncode == 2 and "unknown symbol" in unknown.stderr
    # nothing stored was lost by the failed commands
    assert json.loads(_cli("sql", "SELECT count(*) AS n FROM bars", "--format", "json",
                           data_dir=data_dir, port=gw.port).stdout) == [{"n": 35}]


def test_mixing_rth_is_refused_unless_full(env):
    gw, _, _, data_dir, _ = env
    import asyncio

    from ktrdr_pipeline.loader import LoadError, PipelineContext, load_partition
    from ktrdr_pipeline.settings import Settings

    settings = Settings(ib_port=gw.port, data_dir=data_dir, ib_client_id=70)

    async def go():
        ctx = PipelineContext.from_settings(settings)
        await load_partition(ctx, "SPY", "1h", "2025")
        ctx.rth_overrides["SPY"] = False
        with pytest.raises(LoadError, match="full"):
            await load_partition(ctx, "SPY", "1h", "2025")
        result = await load_partition(ctx, "SPY", "1h", "2025", mode="full")
        await ctx.close()
        return result

    result = asyncio.run(go())
    assert result.use_rth is False and result.rows > 252 * 7
    assert BarStore(data_dir).read_meta("1h", "SPY", "2025").use_rth is False


# -- a thin stock: TRADES bars only where something traded --------------------------------
def _load(gw, data_dir: Path, symbol: str, tf: str, period: str, mode: str = "fill",
          window: tuple[datetime, datetime] | None = None):
    from ktrdr_pipeline.loader import PipelineContext, load_partition
    from ktrdr_pipeline.settings import Settings

    async def go():
        ctx = PipelineContext.from_settings(Settings(ib_port=gw.port, data_dir=data_dir,
                                                     ib_client_id=71))
        try:
            return await load_partition(ctx, symbol, tf, period, mode=mode, window=window)
        finally:
            await ctx.close()

    return asyncio.run(go())


def test_thin_stock_bars_without_trades_are_asked_for_once(env):
    gw, instance, _, data_dir, audit_path = env
    inst = gw.server.universe.by_symbol("ILLQ", "STK")[0]
    start, end = get_timeframe("1m").period_bounds("2026-10")
    traded = gw.server.market.bars(inst, "1 min", start, end, True, MARKET_OPEN, trades=True)
    every = gw.server.market.bars(inst, "1 min", start, end, True, MARKET_OPEN)
    holes = len(every) - len(traded)
    assert holes > 1000  # a thin stock: a third of its regular-hours minutes see no trade

    first = _load(gw, data_dir, "ILLQ", "1m", "2026-10")
    stored = BarStore(data_dir).read("1m", "ILLQ", "2026-10")
    np.testing.assert_array_equal(stored.index.asi8 // 10**9, traded[:, T].astype(np.int64))
    np.testing.assert_array_equal(stored["close"].to_numpy(), traded[:, C])
    assert first.known_empty_bars == holes
    assert 0 < first.ib_requests_made <= 22  # at most one per session of the month

    before = len(_requests(audit_path))
    again = _load(gw, data_dir, "ILLQ", "1m", "2026-10")
    assert again.status == "complete" and again.ib_requests_made == 0
    assert again.known_empty_bars == holes and len(_requests(audit_path)) == before

    # a lost day is fetched again, the holes of other days are not asked for
    store = BarStore(data_dir)
    meta = store.read_meta("1m", "ILLQ", "2026-10")
    day = (stored.index >= pd.Timestamp("2026-10-14", tz=UTC)) & (
        stored.index < pd.Timestamp("2026-10-15", tz=UTC))
    store.write("1m", "ILLQ", "2026-10", stored[~day], use_rth=True, what_to_show="TRADES",
                fetch=meta.fetch)
    refill = _load(gw, data_dir, "ILLQ", "1m", "2026-10")
    new = _requests(audit_path)[before:]
    assert len(new) == 1  # that session's trading hours, no more
    assert new[0]["duration"] in ("1 D", *(f"{n} S" for n in range(60, 23401, 60)))
    assert refill.fetched_bars == day.sum() and store.read("1m", "ILLQ", "2026-10").equals(stored)

    # mode full forgets them, asks again and finds the same
    full = _load(gw, data_dir, "ILLQ", "1m", "2026-10", mode="full")
    assert full.ib_requests_made == first.ib_requests_made and full.known_empty_bars == holes

    # the calendar check tells the holes apart from gaps
    instance.add_dynamic_partitions("symbols", ["ILLQ"])
    meta, checks = _materialize("1m", "ILLQ", "2026-10", env)
    assert meta["ib_requests"].value == 0
    gaps_check = checks["calendar_gaps"]
    assert gaps_check.passed, gaps_check.metadata
    assert gaps_check.metadata["known_empty_bars"].value == holes


def test_thin_stock_tail_confirms_holes_once_they_settle(env):
    from ktrdr_pipeline.freshness import stale_partitions
    from ktrdr_pipeline.loader import HOLE_SETTLE

    gw, _, _, data_dir, audit_path = env
    tf = get_timeframe("1m")
    inst = gw.server.universe.by_symbol("ILLQ", "STK")[0]
    first = _load(gw, data_dir, "ILLQ", "1m", "2026-11")
    assert first.known_empty_bars > 0
    meta = BarStore(data_dir).read_meta("1m", "ILLQ", "2026-11")
    asked = meta.asked_until
    assert abs(asked - MARKET_OPEN.timestamp()) < 60
    newest_hole = max(b for _, b in meta.empty_runs)
    assert newest_hole <= asked - HOLE_SETTLE.total_seconds()  # recent holes not trusted yet
    # the minute before the clock saw no trade; IB was asked after it closed, so there is
    # nothing to chase
    assert len(gw.server.market.bars(inst, "1 min", MARKET_OPEN - timedelta(minutes=1),
                                     MARKET_OPEN, True, MARKET_OPEN, trades=True)) == 0
    assert stale_partitions(data_dir, ["ILLQ"], [tf], gw.server.clock.now()) == []

    gw.server.clock.shift(20 * 60)
    now = gw.server.clock.now()
    [stale] = stale_partitions(data_dir, ["ILLQ"], [tf], now)
    assert stale.period == "2026-11"
    before = len(_requests(audit_path))
    tail = _load(gw, data_dir, "ILLQ", "1m", "2026-11")
    assert tail.ib_requests_made == 1 and len(_requests(audit_path)) == before + 1
    assert tail.known_empty_bars > first.known_empty_bars  # the then-recent holes settled
    stored = BarStore(data_dir).read("1m", "ILLQ", "2026-11")
    start, _ = tf.period_bounds("2026-11")
    traded = gw.server.market.bars(inst, "1 min", start, now, True, now, trades=True)
    closed = stored.index.asi8 // 10**9 < int(now.timestamp()) // 60 * 60
    np.testing.assert_array_equal(stored.index.asi8[closed] // 10**9,
                                  traded[:, T].astype(np.int64)[:closed.sum()])


@pytest.mark.slow
def test_dagster_definitions_validate(tmp_path):
    exe = Path(sys.executable).parent / "dagster"
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    out = subprocess.run([str(exe), "definitions", "validate", "-w", "workspace.yaml"],
                         cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Validation successful" in out.stdout + out.stderr


def test_definitions_are_built_when_dagster_loads_them_not_at_import():
    code = ("import ktrdr_pipeline.definitions as d\n"
            "from ktrdr_pipeline.settings import SettingsError\n"
            "print('imported')\n"
            "try:\n    d.defs()\nexcept SettingsError as exc:\n    print(exc)\n")
    env = {**os.environ, "KTRDR_TIMEFRAMES": "1h,7m", "KTRDR_TAIL_FILL_INTERVAL": "5"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "imported"
    assert "KTRDR_TIMEFRAMES" in out.stdout


def test_the_checks_read_a_partition_once_for_all_five(env, monkeypatch):
    from ktrdr_pipeline.defs.bars import checks as checks_module

    _materialize("1d", "EURUSD", "2026", env)
    reads = []

    class CountingStore(BarStore):
        def read_with_meta(self, *args, **kwargs):
            reads.append(args)
            return super().read_with_meta(*args, **kwargs)

    monkeypatch.setattr(checks_module, "BarStore", CountingStore)
    _, checks = _materialize("1d", "EURUSD", "2026", env)
    assert sorted(checks) == ["bars_outside_sessions", "calendar_gaps", "fresh", "ohlc_valid",
                              "unique_sorted_in_session"]
    assert len(reads) == 1
    assert checks["ohlc_valid"].blocking and not checks["fresh"].blocking
    assert checks["calendar_gaps"].severity == dg.AssetCheckSeverity.WARN
    assert checks["unique_sorted_in_session"].severity == dg.AssetCheckSeverity.ERROR
    outside = checks["bars_outside_sessions"]  # issue 13: a warning, never blocking
    assert outside.severity == dg.AssetCheckSeverity.WARN and not outside.blocking
    # one check on its own: the others are not evaluated
    reads.clear()
    _, instance, resources, _, _ = env
    tf = get_timeframe("1d")
    from ktrdr_pipeline.defs.bars.jobs import build_bar_job

    job = dg.Definitions(assets=[build_bar_asset(tf)], asset_checks=build_checks(tf),
                         jobs=[build_bar_job(tf)], resources=resources).resolve_job_def("bars_1d_job")
    fresh_only = job.get_subset(asset_selection=set(), asset_check_selection={
        dg.AssetCheckKey(dg.AssetKey("bars_1d"), "fresh")})
    result = fresh_only.execute_in_process(
        instance=instance, partition_key=dg.MultiPartitionKey({"symbol": "EURUSD",
                                                               "period": "2026"}))
    assert [e.check_name for e in result.get_asset_check_evaluations()] == ["fresh"]
    assert len(reads) == 1


def test_the_resource_binds_the_variables_that_are_set(monkeypatch, tmp_path):
    from ktrdr_pipeline.defs.resources import ktrdr_resource

    monkeypatch.setenv("IB_PORT", "7497")
    monkeypatch.setenv("KTRDR_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("IB_HOST", raising=False)
    monkeypatch.delenv("IB_CLIENT_ID", raising=False)
    resource = ktrdr_resource({"IB_PORT": "7497", "KTRDR_DATA_DIR": str(tmp_path)})
    settings = resource.process_config_and_initialize().settings()
    assert (settings.ib_host, settings.ib_port, settings.ib_client_id) == ("127.0.0.1", 7497, 1)
    assert settings.data_dir == tmp_path
    monkeypatch.setenv("IB_PORT", "4001")  # resolved when a run initialises the resource
    assert resource.process_config_and_initialize().settings().ib_port == 4001


@pytest.mark.slow
def test_backfill_mode_ranges_and_symbols_commands(env, tmp_path):
    gw, _, _, data_dir, _ = env
    tail = json.loads(_cli("load", "NVDA", "--timeframe", "1d", "--start", "2026-06-01",
                           "--json", data_dir=data_dir, port=gw.port).stdout)
    assert tail["status"] == "ok" and tail["cached_before"] == 0
    back = json.loads(_cli("load", "NVDA", "--timeframe", "1d", "--mode", "backfill",
                           "--start", "2026-03-02", "--json", data_dir=data_dir,
                           port=gw.port).stdout)
    # only the sessions before the first stored bar (2026-06-01) were missing
    assert back["fetched_bars"] == 63 and back["end"] == "2026-06-01"
    ranges = json.loads(_cli("ranges", "NVDA", data_dir=data_dir, port=gw.port).stdout)
    assert ranges["ib_earliest"].startswith("2005-01-03")
    assert ranges["stored"]["1d"]["first_bar"].startswith("2026-03-02")

    home = {"DAGSTER_HOME": str(tmp_path / "home")}

    def symbols(*args):
        return subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", "symbols", *args],
                              env={**os.environ, **home, "KTRDR_DATA_DIR": str(data_dir),
                                   "IB_PORT": str(gw.port), "IB_CLIENT_ID": "61"},
                              capture_output=True, text=True, timeout=120)

    added = symbols("add", "AAPL", "eurusd", "NOPE", "../x")
    assert added.returncode == 1  # some symbols were refused
    outcome = json.loads(added.stdout)
    assert outcome["AAPL"] == {"added": "AAPL"} and outcome["eurusd"] == {"added": "EURUSD"}
    assert "error" in outcome["NOPE"] and "error" in outcome["../x"]
    assert symbols("list").stdout.split() == ["AAPL", "EURUSD"]
    # the universe file, which the symbols sensor applies, lists them too
    assert load_universe(data_dir / "universe.yaml").keys == ["AAPL", "EURUSD"]
    assert json.loads(symbols("remove", "AAPL").stdout) == {"removed": ["AAPL"]}
    assert symbols("list").stdout.split() == ["EURUSD"]
    assert load_universe(data_dir / "universe.yaml").keys == ["EURUSD"]


def _day(day: str) -> tuple[datetime, datetime]:
    """[start, end) of one exchange-time day (a window inside a month of seconds bars)."""
    start = pd.Timestamp(day, tz="US/Eastern")
    return start.tz_convert(UTC).to_pydatetime(), (start + pd.Timedelta(days=1)).tz_convert(
        UTC).to_pydatetime()


def test_thin_stock_second_bars_and_what_ib_no_longer_keeps(env):
    gw, _, _, data_dir, audit_path = env
    inst = gw.server.universe.by_symbol("ILLQ", "STK")[0]
    # yesterday's 5-second bars (a day of the November partition: seconds bars are stored
    # by month since issue 15): most seconds see no trade; asked for once
    first = _load(gw, data_dir, "ILLQ", "5s", "2026-11", window=_day("2026-11-17"))
    start, end = _day("2026-11-17")
    traded = gw.server.market.bars(inst, "5 secs", start, end, True, MARKET_OPEN, trades=True)
    stored = BarStore(data_dir).read("5s", "ILLQ", "2026-11")
    np.testing.assert_array_equal(stored.index.asi8 // 10**9, traded[:, T].astype(np.int64))
    assert first.known_empty_bars == 390 * 12 - len(traded) > 0
    # 6.5 trading hours = 4,680 bars: two requests under the default budget of 2,730 bars
    # per request (issue 12's planner; before it, four 2-hour requests)
    assert first.ib_requests_made == 2
    before = len(_requests(audit_path))
    again = _load(gw, data_dir, "ILLQ", "5s", "2026-11", window=_day("2026-11-17"))
    assert again.ib_requests_made == 0 and len(_requests(audit_path)) == before
    # IB keeps no 5-second bars older than about six months: nothing is asked for, and the
    # bars are not taken for "IB answered without" either — they stay missing
    old = _load(gw, data_dir, "ILLQ", "5s", "2026-03", window=_day("2026-03-02"))
    assert old.ib_requests_made == 0 and old.known_empty_bars == 0 and old.rows == 0
    assert old.missing_bars == 390 * 12
    # ... and the empty result says why, with no empty file written (issue 14 case 7)
    assert old.status == "empty" and "older than IB keeps 5 secs bars" in old.reason
    assert not BarStore(data_dir).path("5s", "ILLQ", "2026-03").exists()


CHECK_NAMES = ("ohlc_valid", "unique_sorted_in_session", "calendar_gaps", "fresh",
               "bars_outside_sessions")


def _assert_partition_records_its_own(instance: dg.DagsterInstance, data_dir: Path, tf_name: str,
                                      partition: str, run_id: str) -> None:
    """Through the instance, as the UI reads it: the partition's latest materialization
    describes its own Parquet file, and each check has a passed evaluation of it that
    judges that materialization."""
    from ktrdr_pipeline.defs.bars.partitions import symbol_period
    from ktrdr_pipeline.store.parquet import BarStore

    key = dg.AssetKey(f"bars_{tf_name}")
    symbol, period = symbol_period(partition)
    [record] = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1).records
    assert record.run_id == run_id
    meta = {k: v.value for k, v in record.asset_materialization.metadata.items()}
    store = BarStore(data_dir)
    frame = store.read(tf_name, symbol, period)
    stored = store.read_meta(tf_name, symbol, period)
    assert len(frame) > 0
    assert meta["rows"] == len(frame), (partition, meta)
    assert meta["first_bar"] == frame.index[0].isoformat(), (partition, meta)
    assert meta["last_bar"] == frame.index[-1].isoformat(), (partition, meta)
    assert (meta["use_rth"], meta["what_to_show"]) == (stored.use_rth, stored.what_to_show)
    assert "partitions" not in meta  # nothing summed over the run's other partitions
    assert str(frame.index[-1]) in meta["preview"]  # a preview of its own newest bars
    assert str(frame["close"].iloc[-1]) in meta["preview"]
    for name in CHECK_NAMES:
        [execution] = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(key, name), limit=1, partition_filter=PartitionKeyFilter(key=partition))
        assert execution.run_id == run_id, (partition, name)
        assert execution.status == AssetCheckExecutionRecordStatus.SUCCEEDED, (partition, name)
        evaluation = execution.event.dagster_event.event_specific_data
        assert evaluation.partition == partition and evaluation.passed, (partition, name)
        # judged this partition's newest materialization: the UI shows it as current
        assert evaluation.target_materialization_data.storage_id == record.storage_id


def _check_partition_statuses(instance: dg.DagsterInstance, tf_name: str) -> dict[str, set[str]]:
    """Per check: its partitions by status, from the cache the UI's partition view reads."""
    from dagster._core.storage.asset_check_state import bulk_update_asset_check_state

    from ktrdr_pipeline.defs.bars.partitions import bar_partitions

    pdef = bar_partitions(get_timeframe(tf_name))
    keys = [(dg.AssetCheckKey(dg.AssetKey(f"bars_{tf_name}"), n), pdef) for n in CHECK_NAMES]
    with dg.partition_loading_context(dynamic_partitions_store=instance):
        states = bulk_update_asset_check_state(
            instance, keys, {k: AssetCheckState.empty() for k, _ in keys})
        return {key.name: {f"{status.value}:{pk}" for status, subset in state.subsets.items()
                           for pk in (subset.subset_value.get_partition_keys()
                                      if not subset.is_empty else [])}
                for key, state in states.items()}


def test_a_packed_run_records_each_partitions_own_metadata_and_checks(env, monkeypatch):
    """A backfill packs partitions into one run (a partition range); each partition still
    records its own materialization metadata and its own result of each check."""
    _, instance, resources, data_dir, _ = env
    monkeypatch.setenv("KTRDR_CLOCK", MARKET_OPEN.isoformat())  # the simulator's: fresh
    tf = get_timeframe("1d")
    # the rectangle 2025..2026 x AAPL..EURUSD: four partitions of two symbols
    first, last = "2025|AAPL", "2026|EURUSD"
    result = dg.materialize(
        [build_bar_asset(tf), *build_checks(tf)], instance=instance, resources=resources,
        tags={"dagster/asset_partition_range_start": first,
              "dagster/asset_partition_range_end": last})
    assert result.success
    partitions = ["2025|AAPL", "2025|EURUSD", "2026|AAPL", "2026|EURUSD"]
    assert sorted(m.partition for m in result.asset_materializations_for_node("bars_1d")) \
        == partitions
    for partition in partitions:
        _assert_partition_records_its_own(instance, data_dir, "1d", partition, result.run_id)
    # the UI's per-partition check status: passed, none skipped
    statuses = _check_partition_statuses(instance, "1d")
    assert statuses == {n: {f"SUCCEEDED:{p}" for p in partitions} for n in CHECK_NAMES}

    # a single-partition run (a sensor's, the UI's) afterwards: its partition's records
    # are the new run's, the others stay as the packed run left them
    again = dg.materialize(
        [build_bar_asset(tf), *build_checks(tf)], instance=instance, resources=resources,
        partition_key="2026|AAPL")
    assert again.success
    _assert_partition_records_its_own(instance, data_dir, "1d", "2026|AAPL", again.run_id)
    _assert_partition_records_its_own(instance, data_dir, "1d", "2025|AAPL", result.run_id)
    assert _check_partition_statuses(instance, "1d") == statuses


def test_partition_metadata_describes_one_partition():
    from ktrdr_pipeline.defs.bars.assets import partition_metadata
    from ktrdr_pipeline.loader import PartitionResult

    loaded = PartitionResult("EURUSD", "1d", "2025", rows=2, first_bar="2025-01-01T00:00:00",
                             last_bar="2025-01-02T00:00:00", ib_requests_made=1,
                             fetched_bars=2, use_rth=False, what_to_show="MIDPOINT",
                             preview=[{"ts": "2025-01-02", "close": 1.04}])
    meta = partition_metadata(loaded)
    assert (meta["rows"], meta["first_bar"], meta["last_bar"]) == (
        2, "2025-01-01T00:00:00", "2025-01-02T00:00:00")
    assert (meta["use_rth"], meta["what_to_show"], meta["ib_requests"]) == (
        False, "MIDPOINT", 1)
    assert meta["preview"].value == "| ts | close |\n|---|---|\n| 2025-01-02 | 1.04 |\n"
    empty = partition_metadata(PartitionResult("AAPL", "1d", "2026", status="no_data"))
    assert empty["rows"] == 0 and empty["first_bar"] == "" and "preview" not in empty


def test_latest_materialization_is_the_partitions_own_newest():
    from ktrdr_pipeline.defs.bars.checks import latest_materialization

    key = dg.AssetKey("bars_1d")
    with dg.instance_for_test() as instance:
        assert latest_materialization(instance, key, "2025|AAPL") is None
        for partition in ("2025|AAPL", "2025|AAPL", "2025|EURUSD"):
            instance.report_runless_asset_event(
                dg.AssetMaterialization(key, partition=partition))
        newest = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=["2025|AAPL"]),
            limit=1).records[0]
        target = latest_materialization(instance, key, "2025|AAPL")
        assert (target.storage_id, target.run_id) == (newest.storage_id, newest.run_id)
        assert latest_materialization(instance, key, "2025|EURUSD").storage_id \
            > target.storage_id


def test_a_packed_run_that_fails_records_the_partitions_it_wrote(env):
    """A packed run that fails part-way (here IB knows no ZZZZ) fails, but the partitions
    it wrote before are recorded as materialized with their own metadata: the UI does
    not show stored bars as missing."""
    _, instance, resources, data_dir, _ = env
    instance.add_dynamic_partitions("symbols", ["ZZZZ"])
    tf = get_timeframe("1d")
    result = dg.materialize(
        [build_bar_asset(tf), *build_checks(tf)], instance=instance, resources=resources,
        tags={"dagster/asset_partition_range_start": "2026|AAPL",
              "dagster/asset_partition_range_end": "2026|ZZZZ"}, raise_on_error=False)
    assert not result.success
    [record] = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("bars_1d"), asset_partitions=["2026|AAPL"]),
        limit=1).records
    assert record.run_id == result.run_id
    frame = BarStore(data_dir).read("1d", "AAPL", "2026")
    assert record.asset_materialization.metadata["rows"].value == len(frame) > 0
