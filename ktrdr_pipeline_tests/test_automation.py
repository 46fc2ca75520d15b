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
from ktrdr_pipeline.defs.bars.partitions import bar_partitions
from ktrdr_pipeline.defs.bars.sensors import (
    build_tail_fill_sensor,
    partitions_in_flight,
    symbols_sensor,
)
from ktrdr_pipeline.defs.resources import KtrdrSettings
from ktrdr_pipeline.domain.timeframes import get_timeframe
from ktrdr_pipeline.loader import PipelineContext, load_partition
from ktrdr_pipeline.settings import AutomationSettings, Settings
from ktrdr_pipeline.simulator.server import GatewayThread
from ktrdr_pipeline.universe import add_entries, load_universe, remove_entries

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
    # MSFT was in the file while its partition existed (the cursor remembers that), then
    # the file dropped it: the sensor deletes the partition
    (data_dir / "universe.yaml").write_text("symbols: [AAPL, ES, MSFT]\n")
    synced = symbols_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert not synced.dynamic_partitions_requests
    (data_dir / "universe.yaml").write_text("symbols: [AAPL, ES]\n")
    result = symbols_sensor(dg.build_sensor_context(instance=instance, resources=resources,
                                                    cursor=synced.cursor))
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


# --- one source of truth for the symbol universe -------------------------------------------


def _tick(instance, resources, cursor=None):
    """One ``symbols_sensor`` tick as the daemon runs it: evaluate, then apply its
    partition requests to the instance; returns the result and the next cursor."""
    result = symbols_sensor(dg.build_sensor_context(instance=instance, resources=resources,
                                                    cursor=cursor))
    if isinstance(result, dg.SkipReason):
        return result, cursor
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name,
                                            list(request.partition_keys))
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return result, result.cursor or cursor


def test_symbols_add_survives_the_symbols_sensor(setup, tmp_path, capsys):
    """``symbols add`` (the CLI, validating through the simulator) writes the universe file
    the sensor applies: three ticks later the symbols are still partitions."""
    from ktrdr_pipeline import cli

    gw, _, resources, data_dir, monkeypatch = setup
    home = tmp_path / "dagster_home"
    data_dir.mkdir(parents=True)
    universe = data_dir / "universe.yaml"
    universe.write_text("# the desk's list\nsymbols:\n  - AAPL  # keep\n")
    for name, value in {"DAGSTER_HOME": str(home), "KTRDR_DATA_DIR": str(data_dir),
                        "IB_PORT": str(gw.port), "IB_CLIENT_ID": "82"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KTRDR_UNIVERSE", raising=False)
    assert cli.main(["symbols", "add", "MSFT", "ES:FUT:CME", "GBPUSD", "NOPE"]) == 1
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["MSFT"] == {"added": "MSFT"} and outcome["GBPUSD"] == {"added": "GBPUSD"}
    assert outcome["ES:FUT:CME"] == {"added": "ES_FUT"} and "error" in outcome["NOPE"]
    text = universe.read_text()
    assert "# the desk's list" in text and "AAPL  # keep" in text  # comments stay
    listed = load_universe(universe)
    assert listed.keys == ["AAPL", "ES_FUT", "GBPUSD", "MSFT"]
    assert {e.key: e.contract for e in listed.entries}["ES_FUT"] == "ES:FUT:CME"
    added = {"MSFT", "ES_FUT", "GBPUSD"}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert set(instance.get_dynamic_partitions("symbols")) == added  # at once
        cursor = None
        for _ in range(3):
            _, cursor = _tick(instance, resources, cursor)
            assert set(instance.get_dynamic_partitions("symbols")) == added | {"AAPL"}
        assert json.loads(cursor)["synced"] == sorted(added | {"AAPL"})
    assert cli.main(["symbols", "remove", "MSFT", "AAPL"]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed": ["MSFT", "AAPL"]}
    assert load_universe(universe).keys == ["ES_FUT", "GBPUSD"]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for _ in range(2):
            _, cursor = _tick(instance, resources, cursor)
            assert sorted(instance.get_dynamic_partitions("symbols")) == ["ES_FUT", "GBPUSD"]


def test_partitions_added_or_deleted_in_the_ui_are_adopted(setup):
    """A partition added the way the UI adds it stays and joins the universe file; one
    whose key the file cannot list is left alone and reported; a partition deleted in the
    UI leaves the file too; a missing or unreadable file changes nothing."""
    _, instance, resources, data_dir, _ = setup
    data_dir.mkdir(parents=True)
    universe = data_dir / "universe.yaml"
    universe.write_text("# ours\nsymbols: [AAPL]\n")
    _, cursor = _tick(instance, resources)
    instance.add_dynamic_partitions("symbols", ["MSFT", "not a symbol"])
    for _ in range(3):
        result, cursor = _tick(instance, resources, cursor)
        assert set(instance.get_dynamic_partitions("symbols")) == {
            "AAPL", "MSFT", "not a symbol"}
    assert load_universe(universe).keys == ["AAPL", "MSFT"]
    assert universe.read_text().startswith("# ours\n")
    assert "left alone ['not a symbol']" in result.skip_reason.skip_message
    instance.delete_dynamic_partition("symbols", "AAPL")  # deleted in the UI
    for _ in range(2):
        _, cursor = _tick(instance, resources, cursor)
    assert load_universe(universe).keys == ["MSFT"]
    assert "AAPL" not in instance.get_dynamic_partitions("symbols")
    universe.write_text("symbols: [MSFT\n")  # a typo while editing: nothing is removed
    result, cursor = _tick(instance, resources, cursor)
    assert "nothing changed" in result.skip_message
    universe.unlink()
    result, cursor = _tick(instance, resources, cursor)
    assert "left as they are" in result.skip_message
    assert "MSFT" in instance.get_dynamic_partitions("symbols")


def test_universe_file_edits_keep_comments_and_never_lose_entries(tmp_path):
    path = tmp_path / "universe.yaml"
    assert add_entries(path, [("AAPL", "AAPL")]) == ["AAPL"]  # created
    block = ("# top\nsymbols:\n  - AAPL   # apple\n  - symbol: ES\n    contract: ES:FUT:CME:USD\n"
             "    timeframes: [1h]\n  - ../bad\n  - SPY\n# trailing\nother: 1\n")
    path.write_text(block)
    assert add_entries(path, [("MSFT", None), ("ES_FUT", "ES:FUT:CME"), ("SPY", None)]) == [
        "MSFT", "ES_FUT"]
    assert load_universe(path).keys == ["AAPL", "ES", "SPY", "MSFT", "ES_FUT"]
    assert remove_entries(path, ["ES", "MSFT", "NVDA"]) == ["ES", "MSFT"]
    text = path.read_text()
    assert text == ("# top\nsymbols:\n  - AAPL   # apple\n  - ../bad\n  - SPY\n"
                    "  - {symbol: ES_FUT, contract: \"ES:FUT:CME\"}\n# trailing\nother: 1\n")
    path.write_text("symbols: [AAPL, {symbol: ES, timeframes: [1d]}]  # flow\n")
    add_entries(path, [("1234", None)])
    assert remove_entries(path, ["AAPL"]) == ["AAPL"]
    assert path.read_text() == "symbols: [{symbol: ES, timeframes: [1d]}, \"1234\"]  # flow\n"
    # a layout it cannot edit in place is rewritten whole: comments go, entries stay
    path.write_text("symbols: !!seq [AAPL, ES]\nrth: 1\n")
    add_entries(path, [("SPY", None)])
    assert load_universe(path).keys == ["AAPL", "ES", "SPY"]
    assert _yaml_load(path)["rth"] == 1


def _yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


# --- no duplicate runs ----------------------------------------------------------------------


def _stale_everywhere(setup, symbols):
    """Every symbol's 1h and 1d bars stored at 10:00, then looked at two hours later: the
    1h partitions are stale."""
    gw, instance, resources, data_dir, monkeypatch = setup
    instance.add_dynamic_partitions("symbols", symbols)
    for sym in symbols:
        _load(gw, data_dir, sym, "1h", "2026")
        _load(gw, data_dir, sym, "1d", "2026")
    monkeypatch.setenv("KTRDR_CLOCK", "2026-11-18T17:05:00+00:00")
    return instance, resources


def test_tail_fill_skips_every_partition_of_a_packed_range(setup):
    """A packed run's range spans every symbol and period between its ends: ES, between
    AAPL and EURUSD in the partitions' order, is held too."""
    from dagster._core.remote_origin import (
        RegisteredCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.test_utils import create_run_for_test

    instance, resources = _stale_everywhere(setup, ["AAPL", "ES", "EURUSD", "SPY"])
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("ktrdr"),
                                                    "__repository__"), "bars_1h_job")
    create_run_for_test(instance, job_name="bars_1h_job", status=dg.DagsterRunStatus.QUEUED,
                        tags={"dagster/asset_partition_range_start": "2025|AAPL",
                              "dagster/asset_partition_range_end": "2026|EURUSD"},
                        asset_selection=frozenset({dg.AssetKey("bars_1h")}),
                        remote_job_origin=origin)
    held = partitions_in_flight(instance, {"bars_1h": bar_partitions(
        get_timeframe("1h"))})
    assert held["bars_1h"] == {f"{p}|{s}" for p in ("2025", "2026")
                               for s in ("AAPL", "ES", "EURUSD")}
    result = tail_fill_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert [str(r.partition_key) for r in result.run_requests] == ["2026|SPY"]


def _launch_backfill(instance, resources, keys):
    import time

    from dagster._core.execution.backfill import PartitionBackfill

    repo, _ = _daily_schedules(resources)
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id="demo", asset_graph=repo.asset_graph, partition_names=keys,
        asset_selection=[dg.AssetKey("bars_1h"), dg.AssetKey("bars_1d")],
        backfill_timestamp=time.time(), tags={}, dynamic_partitions_store=instance,
        all_partitions=False, title="initial backfill", description=None, run_config=None)
    instance.add_backfill(backfill)
    return backfill


def test_sensor_and_schedules_leave_a_backfill_in_progress_alone(setup):
    """Like the demo's start: a backfill of 1h and 1d bars is requested (no run yet); the
    tail-fill sensor and the daily schedules queue nothing for its partitions."""
    from dagster._core.execution.backfill import BulkActionStatus

    instance, resources = _stale_everywhere(setup, ["AAPL", "EURUSD"])
    instance.add_dynamic_partitions("symbols", ["MSFT"])  # no bars, not in the backfill
    backfill = _launch_backfill(instance, resources, ["2026|AAPL", "2026|EURUSD"])
    result = tail_fill_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert sorted(f"{r.partition_key} {r.asset_selection[0].to_user_string()}"
                  for r in result.run_requests) == ["2026|MSFT bars_1d", "2026|MSFT bars_1h"]
    repo, schedules = _daily_schedules(resources)
    wednesday = datetime(2026, 11, 18, 22, 15, tzinfo=UTC)
    for schedule in schedules:
        ctx = dg.build_schedule_context(instance=instance, scheduled_execution_time=wednesday,
                                        resources=resources, repository_def=repo)
        assert [str(r.partition_key) for r in schedule.evaluate_tick(ctx).run_requests] == [
            "2026|MSFT"]
    # once the backfill is over, its partitions are the sensor's again
    instance.update_backfill(backfill.with_status(BulkActionStatus.COMPLETED_SUCCESS))
    result = tail_fill_sensor(dg.build_sensor_context(instance=instance, resources=resources,
                                                      cursor=result.cursor))
    assert sorted(str(r.partition_key) for r in result.run_requests) == [
        "2026|AAPL", "2026|EURUSD"]


def test_an_entry_with_a_bad_option_keeps_its_symbols_partition(setup):
    """A typo in one option of an entry (``timeframes: [1M]``) skips the entry, logged, but
    its symbol stays: the sensor neither deletes its partition nor adopts it a second time
    into the file."""
    _, instance, resources, data_dir, _ = setup
    data_dir.mkdir(parents=True)
    path = data_dir / "universe.yaml"
    path.write_text("symbols: [AAPL, MSFT]\n")
    first = symbols_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    instance.add_dynamic_partitions("symbols", ["AAPL", "MSFT"])
    synced = symbols_sensor(dg.build_sensor_context(instance=instance, resources=resources,
                                                    cursor=first.cursor))
    typo = "symbols:\n  - AAPL\n  - {symbol: MSFT, timeframes: [1M]}\n"
    path.write_text(typo)
    cursor = synced.cursor
    for _ in range(3):
        result = symbols_sensor(dg.build_sensor_context(instance=instance, resources=resources,
                                                        cursor=cursor))
        assert not result.dynamic_partitions_requests
        cursor = result.cursor
    assert sorted(instance.get_dynamic_partitions("symbols")) == ["AAPL", "MSFT"]
    assert path.read_text() == typo  # nothing appended
