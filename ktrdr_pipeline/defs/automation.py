"""Keeping the data current: the symbols sensor, the tail-fill sensor and the daily
tail-fill schedule."""

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg

from ..domain import calendars
from ..domain.timeframes import enabled_timeframes
from ..freshness import stale_partitions
from ..settings import pipeline_now
from ..universe import load_universe, universe_path
from .assets import bar_job_name, bar_jobs
from .partitions import symbol_period
from .resources import KtrdrSettings

ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
          dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def _interval(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a whole number of seconds, got {raw!r}") from None
    if value < 30:
        raise ValueError(f"{name} must be at least 30 seconds, got {value}")
    return value


def _data_dir(ktrdr: KtrdrSettings) -> Path:
    return Path(ktrdr.settings().data_dir)


@dg.sensor(name="symbols_sensor", minimum_interval_seconds=60,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Adds and removes 'symbols' partitions from the universe file.")
def symbols_sensor(context: dg.SensorEvaluationContext, ktrdr: KtrdrSettings):
    data_dir = _data_dir(ktrdr)
    path = universe_path(data_dir)
    if not path.exists():
        return dg.SkipReason(f"no universe file at {path}")
    universe = load_universe(path)
    for error in universe.errors:
        context.log.warning(error)
    wanted = set(universe.keys)
    current = set(context.instance.get_dynamic_partitions("symbols"))
    add, remove = sorted(wanted - current), sorted(current - wanted)
    if not add and not remove:
        return dg.SkipReason(f"{len(current)} symbols, all in the universe file")
    requests = []
    if add:
        requests.append(dg.AddDynamicPartitionsRequest("symbols", add))
    if remove:
        requests.append(dg.DeleteDynamicPartitionsRequest("symbols", remove))
    context.log.info(f"symbols: adding {add}, removing {remove}")
    return dg.SensorResult(dynamic_partitions_requests=requests)


def _partition_key(symbol: str, period: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"symbol": symbol, "period": period})


def _active_partitions(instance: dg.DagsterInstance) -> set[tuple[str, str, str, str]]:
    """(asset, symbol, first period, last period) of every run queued or in progress: one
    partition, or the range a packed backfill run holds (tagged with its first and last
    partition instead of one ``dagster/partition``)."""
    active = set()
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=ACTIVE)):
        tags = record.dagster_run.tags
        first = tags.get("dagster/partition") or tags.get("dagster/asset_partition_range_start")
        last = tags.get("dagster/partition") or tags.get("dagster/asset_partition_range_end")
        if not first or not last:
            continue
        (sym_a, lo), (sym_b, hi) = symbol_period(first), symbol_period(last)
        for key in record.dagster_run.asset_selection or []:
            for symbol in {sym_a, sym_b}:  # one symbol per packed run
                active.add((key.to_user_string(), symbol, lo, hi))
    return active


def _is_active(active: set[tuple[str, str, str, str]], asset: str, symbol: str,
               period: str) -> bool:
    """Whether a queued or running run holds this partition (period keys of one asset
    share one format, so they compare as strings)."""
    return any(a == asset and s == symbol and lo <= period <= hi for a, s, lo, hi in active)


@dg.sensor(name="tail_fill_sensor", jobs=bar_jobs(),
           minimum_interval_seconds=_interval("KTRDR_TAIL_FILL_INTERVAL", 300),
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Requests runs for partitions whose stored bars end before the last "
                       "completed bar IB has (closed markets and holidays are not stale).")
def tail_fill_sensor(context: dg.SensorEvaluationContext, ktrdr: KtrdrSettings):
    data_dir = _data_dir(ktrdr)
    symbols = sorted(context.instance.get_dynamic_partitions("symbols"))
    if not symbols:
        return dg.SkipReason("no symbols yet")
    universe = load_universe(universe_path(data_dir))
    now = pipeline_now()
    stale = stale_partitions(data_dir, symbols, enabled_timeframes(), now,
                             universe.rth_overrides(), universe.wants)
    cursor = json.loads(context.cursor) if context.cursor else {}
    active = _active_partitions(context.instance)
    runs = []
    for item in stale:
        asset = f"bars_{item.timeframe}"
        key = _partition_key(item.symbol, item.period)
        target = item.last_expected.isoformat() if item.last_expected else "initial"
        slot = f"{asset}|{key}"
        if _is_active(active, asset, item.symbol, item.period) or cursor.get(slot) == target:
            continue  # a run for this work is queued, running, or was already requested
        cursor[slot] = target
        runs.append(dg.RunRequest(run_key=f"{slot}|{target}", partition_key=key,
                                  job_name=bar_job_name(item.timeframe),
                                  asset_selection=[dg.AssetKey(asset)],
                                  tags={"ktrdr/trigger": "tail_fill_sensor"}))
    if not runs:
        return dg.SensorResult(skip_reason=dg.SkipReason(
            f"{len(stale)} stale partition(s), all already requested"), cursor=json.dumps(cursor))
    return dg.SensorResult(run_requests=runs, cursor=json.dumps(cursor))


DAILY_FILL_CRON = os.environ.get("KTRDR_DAILY_FILL_CRON", "15 17 * * 1-5")
DAILY_FILL_TZ = os.environ.get("KTRDR_DAILY_FILL_TZ", "US/Eastern")


def current_period_work(data_dir: Path, symbols: list[str], when: datetime
                        ) -> list[tuple[str, str, str]]:
    """(timeframe, symbol, period) of the current period of every symbol × timeframe."""
    universe = load_universe(universe_path(data_dir))
    return [(tf.name, symbol, tf.period_key(when.astimezone(UTC)))
            for tf in enabled_timeframes() for symbol in symbols
            if universe.wants(symbol, tf.name)]


@dg.op(pool="ib_api", description="Loads the current period of every symbol × timeframe "
                                   "through the bar assets' loader.")
def tail_fill_current_periods(context: dg.OpExecutionContext, ktrdr: KtrdrSettings):
    import asyncio

    from ..loader import PipelineContext, load_partition
    from ..store.catalog import CatalogLockedError, refresh_catalog
    from .assets import _metadata

    settings = ktrdr.settings()
    symbols = sorted(context.instance.get_dynamic_partitions("symbols"))

    async def run():
        ctx = PipelineContext.from_settings(settings)
        try:
            work = current_period_work(Path(settings.data_dir), symbols, ctx.clock())
            results = []
            for tf_name, symbol, period in work:
                result = await load_partition(ctx, symbol, tf_name, period)
                results.append((tf_name, symbol, period, result))
            return results
        finally:
            await ctx.close()

    for tf_name, symbol, period, result in asyncio.run(run()):
        context.log.info(f"{symbol} {tf_name} {period}: {result.status}, "
                         f"{result.ib_requests_made} IB request(s)")
        yield dg.AssetMaterialization(asset_key=f"bars_{tf_name}",
                                      partition=str(_partition_key(symbol, period)),
                                      metadata=_metadata([result]))
    try:
        refresh_catalog(settings.data_dir)
    except CatalogLockedError as exc:
        context.log.warning(f"catalog not refreshed: {exc}")


@dg.job(name="daily_tail_fill_job", tags={"ktrdr/trigger": "daily_tail_fill"})
def daily_tail_fill_job():
    tail_fill_current_periods()


@dg.schedule(name="daily_tail_fill", cron_schedule=DAILY_FILL_CRON,
             execution_timezone=DAILY_FILL_TZ, job=daily_tail_fill_job,
             default_status=dg.DefaultScheduleStatus.RUNNING,
             description="After the close of every NYSE trading day: the current period of "
                         "every symbol × timeframe (skips exchange holidays).")
def daily_tail_fill(context: dg.ScheduleEvaluationContext):
    when = context.scheduled_execution_time or datetime.now(UTC)
    day = when.astimezone(ZoneInfo(DAILY_FILL_TZ)).date()
    if not calendars.sessions_on_dates(calendars.STOCK, day, day, True):
        return dg.SkipReason(f"{day} is not an NYSE trading day")
    if not context.instance.get_dynamic_partitions("symbols"):
        return dg.SkipReason("no symbols yet")
    return dg.RunRequest(run_key=f"daily_tail_fill|{day}")
