"""The bar assets in Dagster: one partitioned asset per timeframe with its checks and job,
the symbols and tail-fill sensors and the daily tail-fill schedules.

:func:`defs` builds them from the settings when Dagster loads the code location."""

from __future__ import annotations

import dagster as dg

from ...settings import AutomationSettings, Settings
from .assets import build_bar_asset
from .checks import build_checks
from .jobs import build_bar_job
from .schedules import build_daily_tail_fill
from .sensors import build_tail_fill_sensor, symbols_sensor


def defs(settings: Settings | None = None,
         automation: AutomationSettings | None = None) -> dg.Definitions:
    """The bar definitions for ``settings`` (timeframes, partitions start) and
    ``automation`` (sensor interval, daily cron); both default to the environment's. They
    expect the ``ktrdr`` resource from the code location."""
    settings = settings if settings is not None else Settings.from_env()
    automation = automation if automation is not None else AutomationSettings.from_env()
    timeframes = settings.enabled_timeframes()
    start = settings.partitions_start
    jobs = {tf.name: build_bar_job(tf) for tf in timeframes}
    return dg.Definitions(
        assets=[build_bar_asset(tf, start) for tf in timeframes],
        asset_checks=[c for tf in timeframes for c in build_checks(tf, start)],
        jobs=list(jobs.values()),
        sensors=[symbols_sensor,
                 build_tail_fill_sensor(automation.tail_fill_interval, list(jobs.values()))],
        schedules=[build_daily_tail_fill(tf, jobs[tf.name], automation) for tf in timeframes],
    )
