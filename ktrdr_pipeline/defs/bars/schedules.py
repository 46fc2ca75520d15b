"""The daily tail fill: after the close of every NYSE trading day, a run of the bar job for
the current period of every symbol, so the assets and their checks run as in any other run.

A Dagster schedule launches runs of one job only, and one job cannot span assets with
different partitions (``bars_1m`` is monthly, ``bars_1h`` yearly), so there is one schedule
per timeframe, ``daily_tail_fill_<tf>`` on ``bars_<tf>_job``, all on the same cron
(``KTRDR_DAILY_FILL_CRON`` / ``KTRDR_DAILY_FILL_TZ``). A partition that a queued or
running run or a backfill in progress holds is left to that run.
"""

from datetime import UTC, datetime
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import dagster as dg

from ...domain import calendars
from ...domain.timeframes import Timeframe
from ...settings import AutomationSettings
from ...universe import load_universe
from ..resources import KtrdrSettings
from .partitions import bar_partition_key
from .sensors import asset_graph_of, bar_partitions_in_flight

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

SCHEDULE_PREFIX = "daily_tail_fill"


def daily_tail_fill_name(timeframe: str) -> str:
    return f"{SCHEDULE_PREFIX}_{timeframe}"


def build_daily_tail_fill(tf: Timeframe, job: "UnresolvedAssetJobDefinition",
                          automation: AutomationSettings) -> dg.ScheduleDefinition:
    """``daily_tail_fill_<tf>``: one run of ``job`` per symbol (that wants ``tf``) for the
    period holding the tick; run keys name the day and the partition, so a tick evaluated
    twice queues nothing twice. Skips NYSE holidays, an empty ``symbols`` partition set and
    the partitions a queued or running run or a backfill in progress holds."""
    tz = automation.daily_fill_tz

    @dg.schedule(name=daily_tail_fill_name(tf.name), cron_schedule=automation.daily_fill_cron,
                 execution_timezone=tz, job=job,
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description=f"After the close of every NYSE trading day: the current "
                             f"{tf.period} period of every symbol's {tf.name} bars (skips "
                             "exchange holidays).")
    def _daily_tail_fill(context: dg.ScheduleEvaluationContext, ktrdr: KtrdrSettings):
        when = context.scheduled_execution_time or datetime.now(UTC)
        day = when.astimezone(ZoneInfo(tz)).date()
        if not calendars.sessions_on_dates(calendars.STOCK, day, day, True):
            return dg.SkipReason(f"{day} is not an NYSE trading day")
        symbols = sorted(context.instance.get_dynamic_partitions("symbols"))
        if not symbols:
            return dg.SkipReason("no symbols yet")
        settings = ktrdr.settings()
        universe = load_universe(settings.universe_path)
        period = tf.period_key(when.astimezone(UTC))
        keys = [bar_partition_key(s, period) for s in symbols if universe.wants(s, tf.name)]
        if not keys:
            return dg.SkipReason(f"no symbol wants {tf.name} bars")
        held = bar_partitions_in_flight(context.instance, settings, asset_graph_of(context))
        busy = held.get(f"bars_{tf.name}", set())
        keys = [k for k in keys if str(k) not in busy]
        if not keys:
            return dg.SkipReason("every partition is held by a queued or running run or a "
                                 "backfill in progress")
        return [dg.RunRequest(run_key=f"{SCHEDULE_PREFIX}|{day}|bars_{tf.name}|{key}",
                              partition_key=key, tags={"ktrdr/trigger": SCHEDULE_PREFIX})
                for key in keys]

    return _daily_tail_fill
