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
- :class:`GreeksSchedule`: the cron arithmetic (a run's end, when the newest snapshot is
  due), done here with the code Dagster's scheduler runs; :mod:`ktrdr_pipeline.greeks`
  only receives the resulting times.

Merge :func:`greeks_definitions` into the code location's ``Definitions``; it expects the
``ktrdr`` resource (:class:`~.resources.KtrdrSettings`) defined there.
"""


import asyncio
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import dagster as dg
from dagster._utils.schedules import is_valid_cron_string, schedule_execution_time_iterator

from ..greeks.config import GreeksConfig
from ..greeks.health import Freshness, check_freshness
from ..greeks.runner import run_snapshots
from ..settings import SettingsError, greeks_schedule, parse_utc_time
from .resources import KtrdrSettings

ASSET_NAME = "portfolio_greeks"
JOB_NAME = "greeks_snapshot_job"
SCHEDULE_NAME = "greeks_snapshot_schedule"

_RANGE = re.compile(r"(?<![\d/])(\d+)-(\d+)")
_PROBE_FROM = datetime(2001, 1, 1, tzinfo=UTC)


class GreeksSchedule:
    """``GREEKS_SCHEDULE_CRON`` in ``GREEKS_SCHEDULE_TIMEZONE``, its ticks computed by
    ``schedule_execution_time_iterator``, the function Dagster's scheduler daemon iterates,
    so run ends and the freshness expectation fall on the ticks the daemon fires, DST days
    included (a local time the clocks skip fires at the jump's end, ``30 2 * * *`` at
    03:00; one they repeat fires once, at its second occurrence). A cron Dagster refuses,
    one with a backwards range (``5-1``: cron refuses it, Dagster would wrap it around) or
    one that never fires is a :class:`SettingsError` naming ``GREEKS_SCHEDULE_CRON``."""

    def __init__(self, crons: Sequence[str] | str, timezone: str = "UTC"):
        self.crons = (crons,) if isinstance(crons, str) else tuple(crons)
        self.timezone = timezone
        if not self.crons:
            raise SettingsError("GREEKS_SCHEDULE_CRON: no cron expression given")
        for cron in self.crons:
            if not is_valid_cron_string(cron):
                raise SettingsError(
                    f"GREEKS_SCHEDULE_CRON: {cron!r} is not a cron expression (5 fields: "
                    "minute hour day-of-month month day-of-week, e.g. '* 10-15 * * 1-5')")
            backwards = [m[0] for m in _RANGE.finditer(cron) if int(m[1]) > int(m[2])]
            if backwards:
                raise SettingsError(f"GREEKS_SCHEDULE_CRON: {cron!r}: the range "
                                    f"{backwards[0]!r} runs backwards")
            try:
                next(schedule_execution_time_iterator(_PROBE_FROM.timestamp(), cron, timezone))
            except ValueError:  # croniter gives up looking for a matching day
                raise SettingsError(f"GREEKS_SCHEDULE_CRON: {cron!r} never fires") from None

    @classmethod
    def of(cls, config: GreeksConfig) -> "GreeksSchedule":
        return cls(config.schedule_cron, config.schedule_timezone)

    @property
    def cron_schedule(self) -> str | list[str]:
        """The crons as the schedule definition takes them."""
        return list(self.crons) if len(self.crons) > 1 else self.crons[0]

    def ticks(self, start: datetime, *, ascending: bool = True) -> Iterator[datetime]:
        """The ticks at or after ``start`` (at or before it when descending), in UTC."""
        for tick in schedule_execution_time_iterator(start.timestamp(), self.cron_schedule,
                                                     self.timezone, ascending):
            yield tick.astimezone(UTC)

    def next_after(self, t: datetime) -> datetime:
        """The first tick strictly after ``t``."""
        return next(tick for tick in self.ticks(t) if tick > t)

    def latest_at_or_before(self, t: datetime) -> datetime:
        return next(self.ticks(t, ascending=False))

    def run_end(self, scheduled: datetime, overlap_s: float = 0.0) -> datetime:
        """When the run started for tick ``scheduled`` stops taking snapshots: the next
        tick, or, after the last tick of a block (e.g. 15:59 before a night), as long
        after ``scheduled`` as the gap since the previous tick; plus ``overlap_s``."""
        nxt = self.next_after(scheduled)
        prev = next(tick for tick in self.ticks(scheduled, ascending=False) if tick < scheduled)
        return min(nxt, scheduled + (scheduled - prev)) + timedelta(seconds=overlap_s)

    def expected_newest(self, now: datetime) -> datetime:
        """When the newest snapshot should have been taken: now while a scheduled run
        covers now, else the end of the last scheduled run."""
        return min(now, self.run_end(self.latest_at_or_before(now)))


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
    report = greeks_freshness(GreeksConfig.from_env(settings=ktrdr.settings()))
    return dg.AssetCheckResult(passed=report.passed, severity=dg.AssetCheckSeverity.WARN,
                               description=report.message, metadata=report.metadata())


def greeks_freshness(config: GreeksConfig, now: datetime | None = None) -> Freshness:
    """The freshness check's verdict at ``now``, the schedule saying when the newest
    snapshot is due."""
    now = now or datetime.now(UTC)
    return check_freshness(config, now, GreeksSchedule.of(config).expected_newest(now))


greeks_snapshot_job = dg.define_asset_job(
    JOB_NAME, selection=dg.AssetSelection.assets(portfolio_greeks),
    description="Portfolio Greeks snapshots until the schedule's next tick.")


def run_config_for_tick(scheduled: datetime,
                        env: Mapping[str, str] | None = None) -> dict[str, object]:
    """The run config the schedule gives the run of tick ``scheduled``."""
    cfg = GreeksConfig.from_env(env)
    until = GreeksSchedule.of(cfg).run_end(scheduled, cfg.run_overlap)
    return {"ops": {ASSET_NAME: {"config": {"until": until.isoformat(),
                                            "scheduled": scheduled.isoformat()}}}}


def build_schedule(env: Mapping[str, str] | None = None) -> dg.ScheduleDefinition:
    """The schedule; a bad ``GREEKS_SCHEDULE_*`` value stops the definitions loading."""
    schedule = GreeksSchedule(*greeks_schedule(env))

    @dg.schedule(
        name=SCHEDULE_NAME,
        job=greeks_snapshot_job,
        cron_schedule=schedule.cron_schedule,
        execution_timezone=schedule.timezone,
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
