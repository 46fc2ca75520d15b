"""The Dagster shell of the Greeks bridge: asset, freshness check, job, schedule."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from ktrdr_pipeline.defs import greeks
from ktrdr_pipeline.defs.greeks.assets import ASSET_NAME, greeks_freshness, portfolio_greeks
from ktrdr_pipeline.defs.greeks.jobs import JOB_NAME
from ktrdr_pipeline.defs.greeks.schedules import SCHEDULE_NAME, run_config_for_tick
from ktrdr_pipeline.defs.resources import KtrdrSettings
from ktrdr_pipeline.greeks.config import GreeksConfig
from ktrdr_pipeline.greeks.model import Snapshot
from ktrdr_pipeline.greeks.runner import next_tick
from ktrdr_pipeline.greeks.store import GreeksStore, read_rows
from ktrdr_pipeline.simulator.server import GatewayThread

WEEKEND = datetime(2026, 11, 21, 15, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def dagster_instance() -> Iterator[dg.DagsterInstance]:
    """Each test inside its own instance: it also sets Dagster's context-wide definitions
    state storage, which an instance left over by an earlier test can leave dangling
    ("Attempted to resolve undefined DagsterInstance weakref" on loading definitions)."""
    with dg.instance_for_test() as instance:
        yield instance


def _defs(env: dict[str, str] | None = None) -> dg.Definitions:
    defs = greeks.defs(env, standalone=True)
    dg.Definitions.validate_loadable(defs)
    return defs


def test_definitions_load_and_merge_with_the_bar_definitions(monkeypatch, tmp_path):
    monkeypatch.setenv("KTRDR_DATA_DIR", str(tmp_path))
    from ktrdr_pipeline.definitions import defs  # bars and Greeks together

    merged = defs()  # built when Dagster loads the code location
    dg.Definitions.validate_loadable(merged)
    repo = merged.get_repository_def()
    assert dg.AssetKey(ASSET_NAME) in repo.asset_graph.get_all_asset_keys()
    assert repo.has_job(JOB_NAME) and repo.has_schedule_def(SCHEDULE_NAME)
    checks = {k.name for k in repo.asset_graph.asset_check_keys}
    assert "portfolio_greeks_fresh" in checks
    assert dg.AssetKey("bars_1h") in repo.asset_graph.get_all_asset_keys()


def test_schedule_defaults_and_run_config(monkeypatch, tmp_path):
    monkeypatch.setenv("KTRDR_DATA_DIR", str(tmp_path))
    for k in ("GREEKS_SCHEDULE_CRON", "GREEKS_SCHEDULE_TIMEZONE", "GREEKS_RUN_OVERLAP"):
        monkeypatch.delenv(k, raising=False)
    defs = _defs()
    sched = defs.resolve_schedule_def(SCHEDULE_NAME)
    assert sched.execution_timezone == "America/New_York"
    assert list(sched.cron_schedule) == ["30-59 9 * * 1-5", "* 10-15 * * 1-5"]
    assert sched.job_name == JOB_NAME
    tick = datetime(2026, 11, 18, 20, 59, tzinfo=UTC)  # 15:59 ET, the day's last tick
    result = sched.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=tick))
    (request,) = result.run_requests
    cfg = request.run_config["ops"][ASSET_NAME]["config"]
    assert datetime.fromisoformat(cfg["until"]) == datetime(2026, 11, 18, 21, 0, 30, tzinfo=UTC)
    assert datetime.fromisoformat(cfg["scheduled"]) == tick
    mid = datetime(2026, 11, 18, 17, 0, tzinfo=UTC)
    until = run_config_for_tick(mid, {"KTRDR_DATA_DIR": str(tmp_path),
                                      "GREEKS_RUN_OVERLAP": "0"})
    assert until["ops"][ASSET_NAME]["config"]["until"] == "2026-11-18T17:01:00+00:00"


def test_schedule_is_configurable(tmp_path):
    env = {"KTRDR_DATA_DIR": str(tmp_path), "GREEKS_SCHEDULE_CRON": "*/5 8-17 * * *",
           "GREEKS_SCHEDULE_TIMEZONE": "Europe/London"}
    sched = _defs(env).resolve_schedule_def(SCHEDULE_NAME)
    assert sched.cron_schedule == "*/5 8-17 * * *"
    assert sched.execution_timezone == "Europe/London"
    # the run lasts until the next tick of this schedule, not of the process's environment
    tick = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    result = sched.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=tick))
    (request,) = result.run_requests
    until = datetime.fromisoformat(request.run_config["ops"][ASSET_NAME]["config"]["until"])
    assert until == datetime(2026, 11, 21, 12, 5, 30, tzinfo=UTC)  # + the default 30 s


@pytest.mark.slow
def test_scheduled_run_snapshots_until_the_next_tick(monkeypatch, tmp_path, dagster_instance):
    with GatewayThread(clock=WEEKEND, latency="none", tick_interval=0.2) as gw:
        env = {"KTRDR_DATA_DIR": str(tmp_path), "IB_PORT": str(gw.port),
               "IB_API_MODE": "SOCKET", "BRIDGE_POLL_INTERVAL": "1",
               "GREEKS_SCHEDULE_CRON": "* * * * *", "GREEKS_SCHEDULE_TIMEZONE": "UTC"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        defs = _defs()
        job = defs.resolve_job_def(JOB_NAME)
        # room for the run to start on a loaded machine and still reach two ticks
        until = datetime.fromtimestamp(next_tick(time.time(), 1.0) + 4.5, UTC)
        result = job.execute_in_process(
            run_config={"ops": {ASSET_NAME: {"config": {"until": until.isoformat()}}}},
            instance=dagster_instance)
    assert result.success
    (mat,) = result.asset_materializations_for_node(ASSET_NAME)
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["mode"] == "SOCKET" and meta["snapshots"] == meta["ticks"] >= 2
    # never before its tick; how soon after depends on the load (bench_greeks: under 1 s)
    assert meta["max_drift_s"] >= 0
    assert datetime.fromisoformat(meta["last_tick"]) < until
    (check,) = [e.event_specific_data for e in result.all_events
                if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert check.check_name == "portfolio_greeks_fresh" and check.passed
    rows = read_rows(tmp_path / "greeks.duckdb", "SELECT count(*) AS n FROM portfolio_greeks "
                                                 "WHERE con_id = 0")
    assert rows[0]["n"] == meta["snapshots"]


def test_a_run_without_config_takes_one_snapshot_and_a_bad_mode_fails_it(
        monkeypatch, tmp_path, dagster_instance):
    with GatewayThread(clock=WEEKEND, latency="none", tick_interval=0.2) as gw:
        monkeypatch.setenv("KTRDR_DATA_DIR", str(tmp_path))
        monkeypatch.setenv("IB_PORT", str(gw.port))
        monkeypatch.setenv("IB_API_MODE", "SOCKET")
        result = dg.materialize([portfolio_greeks],
                                resources={"ktrdr": KtrdrSettings()},
                                instance=dagster_instance)
        assert result.success
        meta = {k: v.value for k, v in
                result.asset_materializations_for_node(ASSET_NAME)[0].metadata.items()}
        assert meta["snapshots"] == 1 and meta["portfolio_positions"] == 8
        # the one snapshot is the run's one tick: its metadata says when it was taken
        assert meta["ticks"] == 1 and meta["first_tick"] == meta["last_tick"] != ""
        monkeypatch.setenv("IB_API_MODE", "FIX")
        result = dg.materialize([portfolio_greeks], resources={"ktrdr": KtrdrSettings()},
                                instance=dagster_instance, raise_on_error=False)
        assert not result.success
        (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "IB_API_MODE must be one of SOCKET, PORTAL" in str(
            failure.event_specific_data.error)


# -- freshness ------------------------------------------------------------------------------------
def _snap(tick: datetime) -> Snapshot:
    return Snapshot(account="DU1", mode="SOCKET", tick_time=tick, snapshot_time=tick)


@pytest.fixture
def market_cfg(tmp_path) -> GreeksConfig:
    return GreeksConfig.from_env({"KTRDR_DATA_DIR": str(tmp_path), "GREEKS_MAX_AGE": "120"})


def test_freshness_during_and_after_market_hours(market_cfg):
    during = datetime(2026, 11, 18, 16, 0, 20, tzinfo=UTC)  # 11:00:20 ET, a Wednesday
    report = greeks_freshness(market_cfg, during)
    assert not report.passed and "does not exist" in report.message
    store = GreeksStore(market_cfg.db_path, market_cfg.buffer_path)
    store.bootstrap()
    store.write_snapshot(_snap(during - timedelta(seconds=200)))
    report = greeks_freshness(market_cfg, during)
    assert not report.passed and report.age_s == 200
    store.write_snapshot(_snap(during - timedelta(seconds=5)))
    assert greeks_freshness(market_cfg, during).passed
    # at night the newest snapshot is expected at the end of the day's last run (16:00 ET)
    night = datetime(2026, 11, 19, 3, 0, tzinfo=UTC)
    assert not greeks_freshness(market_cfg, night).passed
    store.write_snapshot(_snap(datetime(2026, 11, 18, 20, 59, 55, tzinfo=UTC)))
    report = greeks_freshness(market_cfg, night)
    assert report.passed and report.expected_by == datetime(2026, 11, 18, 21, 0, tzinfo=UTC)
