"""Dagster shell of the portfolio Greeks bridge (the core is :mod:`ktrdr_pipeline.greeks`).

- ``portfolio_greeks``: the DuckDB table ``portfolio_greeks`` as an asset. A scheduled run
  takes a snapshot every ``BRIDGE_POLL_INTERVAL`` seconds on the wall-clock grid until the
  schedule's next tick plus ``GREEKS_RUN_OVERLAP`` seconds (the next run's start-up time;
  ticks are claimed across processes and stored once, so the overlap costs nothing). A
  run without config (materialized by hand) takes one snapshot.
- ``portfolio_greeks_fresh``: the newest snapshot is at most ``GREEKS_MAX_AGE`` seconds
  older than the schedule says it should be (warning severity).
- ``greeks_snapshot_job`` and ``greeks_snapshot_schedule`` (default every minute during US
  market hours, ``GREEKS_SCHEDULE_CRON`` / ``GREEKS_SCHEDULE_TIMEZONE``), separate from the
  bar assets (no ``ib_api`` pool: a long backfill never delays the Greeks).

Merge :func:`greeks_definitions` into the code location's ``Definitions``; it expects the
``ktrdr`` resource (:class:`~.resources.KtrdrSettings`) defined there.
"""


import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime

import dagster as dg

from ..greeks.config import GreeksConfig, schedule_settings
from ..greeks.health import check_freshness
from ..greeks.runner import run_snapshots
from ..settings import parse_utc_time
from .resources import KtrdrSettings

ASSET_NAME = "portfolio_greeks"
JOB_NAME = "greeks_snapshot_job"
SCHEDULE_NAME = "greeks_snapshot_schedule"


class GreeksRunConfig(dg.Config):
    """``until``: ISO 8601 time at which the run stops taking snapshots (set by the
    schedule); empty: take one snapshot. ``scheduled``: the schedule tick, for the record."""

    until: str = ""
    scheduled: str = ""


def _meta(values: Mapping[str, object]) -> dict[str, object]:
    return {k: "" if v is None else v for k, v in values.items()}


def _parse_time(text: str, name: str) -> datetime:
    try:
        return parse_utc_time(text)
    except ValueError:
        raise dg.Failure(f"{name} must be an ISO 8601 time, got {text!r}") from None


@dg.asset(
    name=ASSET_NAME,
    group_name="greeks",
    kinds={"duckdb"},
    description="Portfolio option Greeks: one PORTFOLIO aggregate row and one row per "
                "position every BRIDGE_POLL_INTERVAL seconds, in KTRDR_DATA_DIR/greeks.duckdb "
                "(table portfolio_greeks; connection events in api_logs).",
)
def portfolio_greeks(context: dg.AssetExecutionContext, config: GreeksRunConfig,
                     ktrdr: KtrdrSettings) -> dg.MaterializeResult:
    cfg = GreeksConfig.from_env(settings=ktrdr.settings())  # bad settings fail here, first
    until = _parse_time(config.until, "until") if config.until else None
    context.log.info(f"{cfg.mode} bridge: "
                     + (f"snapshots until {until.isoformat()}" if until else "one snapshot"))
    stats, snap = asyncio.run(run_snapshots(cfg, until=until, once=until is None))
    if until is not None and stats.ticks and not stats.snapshots and not stats.taken_elsewhere:
        raise dg.Failure(f"no snapshot in {stats.ticks} tick(s): IB unreachable "
                         f"({cfg.mode}); see api_logs", metadata=_meta(stats.as_dict()))
    meta: dict[str, object] = {**stats.as_dict(), "mode": cfg.mode,
                               "database": str(cfg.db_path)}
    if snap is not None:
        meta.update({f"portfolio_{k}": v for k, v in snap.summary().items()
                     if k != "snapshot_id"})
    if config.scheduled:
        meta["scheduled"] = config.scheduled
    return dg.MaterializeResult(metadata=_meta(meta))


@dg.asset_check(asset=portfolio_greeks, name="portfolio_greeks_fresh",
                description="The newest snapshot is at most GREEKS_MAX_AGE seconds older than "
                            "the schedule expects (now during scheduled hours, else the end "
                            "of the last scheduled run).")
def portfolio_greeks_fresh(ktrdr: KtrdrSettings) -> dg.AssetCheckResult:
    cfg = GreeksConfig.from_env(settings=ktrdr.settings())
    report = check_freshness(cfg)
    return dg.AssetCheckResult(passed=report.passed, severity=dg.AssetCheckSeverity.WARN,
                               description=report.message, metadata=report.metadata())


greeks_snapshot_job = dg.define_asset_job(
    JOB_NAME, selection=dg.AssetSelection.assets(portfolio_greeks),
    description="Portfolio Greeks snapshots until the schedule's next tick.")


def run_config_for_tick(scheduled: datetime,
                        env: Mapping[str, str] | None = None) -> dict[str, object]:
    """The run config the schedule gives the run of tick ``scheduled``."""
    cfg = GreeksConfig.from_env(env)
    until = cfg.schedule().run_end(scheduled, cfg.run_overlap)
    return {"ops": {ASSET_NAME: {"config": {"until": until.isoformat(),
                                            "scheduled": scheduled.isoformat()}}}}


def build_schedule(env: Mapping[str, str] | None = None) -> dg.ScheduleDefinition:
    crons, tz = schedule_settings(env)

    @dg.schedule(
        name=SCHEDULE_NAME,
        job=greeks_snapshot_job,
        cron_schedule=list(crons) if len(crons) > 1 else crons[0],
        execution_timezone=tz,
        description="Portfolio Greeks: each run snapshots every BRIDGE_POLL_INTERVAL s until "
                    "the next tick (+ GREEKS_RUN_OVERLAP s). GREEKS_SCHEDULE_CRON / "
                    "GREEKS_SCHEDULE_TIMEZONE.",
    )
    def greeks_snapshot_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        scheduled = context.scheduled_execution_time or datetime.now(UTC)
        if scheduled.tzinfo is None:
            scheduled = scheduled.replace(tzinfo=UTC)
        run_config = run_config_for_tick(scheduled, env)
        return dg.RunRequest(run_config=run_config,
                             tags={"ktrdr/greeks_until":
                                   run_config["ops"][ASSET_NAME]["config"]["until"]})

    return greeks_snapshot_schedule


def greeks_definitions(env: Mapping[str, str] | None = None, *,
                       standalone: bool = False) -> dg.Definitions:
    """The Greeks asset, its check, job and schedule, to merge with the code location's
    ``Definitions`` (which provides the ``ktrdr`` resource; Dagster refuses two resource
    objects under one key). ``standalone=True`` adds the ``ktrdr`` resource, for using
    these definitions on their own."""
    return dg.Definitions(
        assets=[portfolio_greeks],
        asset_checks=[portfolio_greeks_fresh],
        jobs=[greeks_snapshot_job],
        schedules=[build_schedule(env)],
        resources={"ktrdr": KtrdrSettings()} if standalone else None,
    )
