"""``greeks_snapshot_schedule`` (default every minute during US market hours,
``GREEKS_SCHEDULE_CRON`` / ``GREEKS_SCHEDULE_TIMEZONE``; off until turned on)."""


from collections.abc import Mapping
from datetime import UTC, datetime

import dagster as dg

from ...greeks.config import GreeksConfig
from ...settings import greeks_schedule
from .assets import ASSET_NAME
from .jobs import greeks_snapshot_job
from .ticks import GreeksSchedule

SCHEDULE_NAME = "greeks_snapshot_schedule"


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
