"""Sensors and the daily schedules, driven with Dagster's test contexts against the
simulator with a fixed clock."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import dagster as dg
import pytest

from ktrdr_pipeline.defs import bars
from ktrdr_pipeline.defs.bars.jobs import build_bar_job
from ktrdr_pipeline.defs.bars.sensors import build_tail_fill_sensor, symbols_sensor
from ktrdr_pipeline.defs.resources import KtrdrSettings
from ktrdr_pipeline.domain.timeframes import get_timeframe
from ktrdr_pipeline.loader import PipelineContext, load_partition
from ktrdr_pipeline.settings import AutomationSettings, Settings
from ktrdr_pipeline.simulator.server import GatewayThread

tail_fill_sensor = build_tail_fill_sensor(300, [build_bar_job(get_timeframe(n))
                                                for n in ("1h", "1d")])

#: Wednesday 2026-11-18 15:00 UTC = 10:00 US/Eastern: NYSE open.
WEDNESDAY = datetime(2026, 11, 18, 15, 0, tzinfo=UTC)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("KTRDR_TIMEFRAMES", "1h,1d")
    data_dir = tmp_path / "data"
    with GatewayThread(clock=WEDNESDAY, latency="none") as gw, dg.instance_for_test() as instance:
        resources = {"ktrdr": KtrdrSettings(ib_port=gw.port, data_dir=str(data_dir),
                                            ib_client_id=80)}
        yield gw, instance, resources, data_dir, monkeypatch


def _load(gw, data_dir, symbol, tf, period):
    async def go():
        ctx = PipelineContext.from_settings(Settings(ib_port=gw.port, data_dir=data_dir,
                                                     ib_client_id=81))
        try:
            return await load_partition(ctx, symbol, tf, period)
        finally:
            await ctx.close()
    return asyncio.run(go())


def test_symbols_sensor_applies_valid_entries_and_reports_invalid(setup):
    _, instance, resources, data_dir, _ = setup
    data_dir.mkdir(parents=True)
    (data_dir / "universe.yaml").write_text(
        "symbols:\n  - AAPL\n  - ../etc/passwd\n  - {symbol: ES, contract: 'ES:FUT:CME:USD', "
        "timeframes: [1h]}\n  - {symbol: EURUSD, timeframes: [7m]}\n  - {nosymbol: 1}\n")
    ctx = dg.build_sensor_context(instance=instance, resources=resources)
    result = symbols_sensor(ctx)
    [add] = result.dynamic_partitions_requests
    assert isinstance(add, dg.AddDynamicPartitionsRequest)
    assert sorted(add.partition_keys) == ["AAPL", "ES"]
    instance.add_dynamic_partitions("symbols", ["AAPL", "ES", "MSFT"])
    (data_dir / "universe.yaml").write_text("symbols: [AAPL, ES]\n")
    result = symbols_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    [remove] = result.dynamic_partitions_requests
    assert isinstance(remove, dg.DeleteDynamicPartitionsRequest)
    assert list(remove.partition_keys) == ["MSFT"]


def test_tail_fill_requests_stale_partitions_once(setup):
    gw, instance, resources, data_dir, monkeypatch = setup
    instance.add_dynamic_partitions("symbols", ["AAPL", "EURUSD"])
    _load(gw, data_dir, "AAPL", "1h", "2026")
    _load(gw, data_dir, "AAPL", "1d", "2026")
    _load(gw, data_dir, "EURUSD", "1h", "2026")
    _load(gw, data_dir, "EURUSD", "1d", "2026")
    # Two hours later the stored AAPL/EURUSD 1h bars end before the last closed bar
    monkeypatch.setenv("KTRDR_CLOCK", "2026-11-18T17:05:00+00:00")
    ctx = dg.build_sensor_context(instance=instance, resources=resources)
    result = tail_fill_sensor(ctx)
    requested = sorted(str(r.partition_key) + " " + r.asset_selection[0].to_user_string()
                       for r in result.run_requests)
    assert requested == ["2026|AAPL bars_1h", "2026|EURUSD bars_1h"]  # daily bars are fresh
    assert {r.job_name for r in result.run_requests} == {"bars_1h_job"}
    # the cursor prevents asking again for the same work
    again = tail_fill_sensor(dg.build_sensor_context(instance=instance, resources=resources,
                                                     cursor=result.cursor))
    assert not again.run_requests


def test_closed_market_and_holiday_are_not_stale(setup):
    gw, instance, resources, data_dir, monkeypatch = setup
    instance.add_dynamic_partitions("symbols", ["AAPL"])
    _load(gw, data_dir, "AAPL", "1h", "2026")
    _load(gw, data_dir, "AAPL", "1d", "2026")
    # bring the store up to the close of Wednesday 18th, then look on Thursday 04:00 ET
    gw.server.clock.shift(6 * 3600 + 5 * 60)
    _load(gw, data_dir, "AAPL", "1h", "2026")
    _load(gw, data_dir, "AAPL", "1d", "2026")
    monkeypatch.setenv("KTRDR_CLOCK", "2026-11-19T09:00:00+00:00")
    result = tail_fill_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert not result.run_requests


def test_unknown_symbol_gets_an_initial_run(setup):
    _, instance, resources, _, monkeypatch = setup
    instance.add_dynamic_partitions("symbols", ["MSFT"])
    monkeypatch.setenv("KTRDR_CLOCK", WEDNESDAY.isoformat())
    result = tail_fill_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert sorted(r.asset_selection[0].to_user_string() for r in result.run_requests) == [
        "bars_1d", "bars_1h"]
    assert json.loads(result.cursor)


def _daily_schedules(resources) -> tuple[dg.RepositoryDefinition, list]:
    defs = dg.Definitions.merge(bars.defs(Settings(timeframes=("1h", "1d")),
                                          AutomationSettings()),
                                dg.Definitions(resources=resources))
    repo = defs.get_repository_def()
    return repo, [repo.get_schedule_def(f"daily_tail_fill_{tf}") for tf in ("1h", "1d")]


def test_daily_schedule_skips_holidays(setup):
    _, instance, resources, data_dir, _ = setup
    repo, schedules = _daily_schedules(resources)
    friday = datetime(2026, 11, 27, 22, 15, tzinfo=UTC)
    for schedule in schedules:
        assert (schedule.cron_schedule, schedule.execution_timezone) == (
            "15 17 * * 1-5", "US/Eastern")
        ctx = dg.build_schedule_context(instance=instance, scheduled_execution_time=friday,
                                        resources=resources, repository_def=repo)
        assert schedule.evaluate_tick(ctx).skip_message == "no symbols yet"
    instance.add_dynamic_partitions("symbols", ["AAPL", "ES"])
    data_dir.mkdir(parents=True)
    (data_dir / "universe.yaml").write_text(
        "symbols: [AAPL, {symbol: ES, timeframes: [1d]}]\n")
    thanksgiving = datetime(2026, 11, 26, 22, 15, tzinfo=UTC)
    ctx = dg.build_schedule_context(instance=instance, scheduled_execution_time=thanksgiving,
                                    resources=resources, repository_def=repo)
    assert "not an NYSE trading day" in schedules[0].evaluate_tick(ctx).skip_message
    requested = {}
    for schedule in schedules:
        ctx = dg.build_schedule_context(instance=instance, scheduled_execution_time=friday,
                                        resources=resources, repository_def=repo)
        requests = schedule.evaluate_tick(ctx).run_requests
        assert all("2026-11-27" in r.run_key for r in requests)
        assert len({r.run_key for r in requests}) == len(requests)
        assert all(r.tags["ktrdr/trigger"] == "daily_tail_fill" for r in requests)
        requested[schedule.job_name] = sorted(str(r.partition_key) for r in requests)
    # one run per symbol x timeframe on that timeframe's job, for the current period; ES
    # wants daily bars only
    assert requested == {"bars_1h_job": ["2026|AAPL"], "bars_1d_job": ["2026|AAPL", "2026|ES"]}


def test_sensor_and_fresh_check_share_one_test_of_behind():
    """The stored bar in progress does not make a partition current once it has closed;
    a missing bar IB was asked for after it closed does not make it behind."""
    import numpy as np
    import pandas as pd

    from ktrdr_pipeline.domain.bars import FetchState
    from ktrdr_pipeline.freshness import behind, completed_starts

    t0 = 1_763_478_000  # 2025-11-18 15:00 UTC
    starts = np.arange(t0, t0 + 5 * 60, 60, dtype=np.int64)
    ends = starts + 60
    index = pd.DatetimeIndex(pd.to_datetime(starts, unit="s", utc=True), name="ts").as_unit("ns")
    frame = pd.DataFrame({"close": np.arange(5.0)}, index=index)
    # the last bar was fetched while in progress, and it has closed since
    state = FetchState(partial_from=int(starts[-1]), asked_until=int(starts[-1]) + 30)
    done = completed_starts(frame, state)
    assert list(done) == list(starts[:-1])
    assert behind(done, state, starts, ends)
    # fetched again after it closed: IB returned nothing newer (a minute without a trade)
    again = FetchState(partial_from=int(starts[-1]), asked_until=int(ends[-1]))
    assert not behind(done, again, starts, ends)
    assert not behind(completed_starts(frame, FetchState()), FetchState(), starts, ends)
    empty = frame.iloc[:0]
    assert behind(completed_starts(empty, FetchState()), FetchState(), starts, ends)


@pytest.mark.parametrize("tags", [
    {"dagster/partition": "2026|AAPL"},
    # a packed backfill run names its first and last partition instead
    {"dagster/asset_partition_range_start": "2024|AAPL",
     "dagster/asset_partition_range_end": "2026|AAPL"},
])
def test_tail_fill_skips_partitions_a_queued_or_running_run_holds(setup, tags):
    from dagster._core.test_utils import create_run_for_test

    gw, instance, resources, data_dir, monkeypatch = setup
    instance.add_dynamic_partitions("symbols", ["AAPL", "EURUSD"])
    for sym in ("AAPL", "EURUSD"):
        _load(gw, data_dir, sym, "1h", "2026")
        _load(gw, data_dir, sym, "1d", "2026")
    monkeypatch.setenv("KTRDR_CLOCK", "2026-11-18T17:05:00+00:00")
    create_run_for_test(instance, job_name="bars_1h_job", status=dg.DagsterRunStatus.STARTED,
                        tags=tags, asset_selection=frozenset({dg.AssetKey("bars_1h")}))
    result = tail_fill_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert [str(r.partition_key) for r in result.run_requests] == ["2026|EURUSD"]
