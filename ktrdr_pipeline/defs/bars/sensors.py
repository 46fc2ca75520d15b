"""Keeping the data current: the symbols sensor (the universe file -> the ``symbols``
partitions) and the tail-fill sensor (runs for stale partitions)."""

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import dagster as dg

from ...freshness import stale_partitions
from ...settings import pipeline_now
from ...universe import load_universe
from ..resources import KtrdrSettings
from .assets import bar_asset_key
from .jobs import bar_job_name
from .partitions import bar_partition_key, symbol_period

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
          dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


@dg.sensor(name="symbols_sensor", minimum_interval_seconds=60,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Adds and removes 'symbols' partitions from the universe file.")
def symbols_sensor(context: dg.SensorEvaluationContext, ktrdr: KtrdrSettings):
    path = ktrdr.settings().universe_path
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


def tail_fill(context: dg.SensorEvaluationContext, ktrdr: KtrdrSettings):
    """The tail-fill sensor's evaluation (see :func:`build_tail_fill_sensor`)."""
    settings = ktrdr.settings()
    symbols = sorted(context.instance.get_dynamic_partitions("symbols"))
    if not symbols:
        return dg.SkipReason("no symbols yet")
    universe = load_universe(settings.universe_path)
    now = pipeline_now()
    stale = stale_partitions(settings.data_dir, symbols, settings.enabled_timeframes(), now,
                             universe.rth_overrides(), universe.wants)
    cursor = json.loads(context.cursor) if context.cursor else {}
    active = _active_partitions(context.instance)
    runs = []
    for item in stale:
        asset = f"bars_{item.timeframe}"
        key = bar_partition_key(item.symbol, item.period)
        target = item.last_expected.isoformat() if item.last_expected else "initial"
        slot = f"{asset}|{key}"
        if _is_active(active, asset, item.symbol, item.period) or cursor.get(slot) == target:
            continue  # a run for this work is queued, running, or was already requested
        cursor[slot] = target
        runs.append(dg.RunRequest(run_key=f"{slot}|{target}", partition_key=key,
                                  job_name=bar_job_name(item.timeframe),
                                  asset_selection=[bar_asset_key(item.timeframe)],
                                  tags={"ktrdr/trigger": "tail_fill_sensor"}))
    if not runs:
        return dg.SensorResult(skip_reason=dg.SkipReason(
            f"{len(stale)} stale partition(s), all already requested"), cursor=json.dumps(cursor))
    return dg.SensorResult(run_requests=runs, cursor=json.dumps(cursor))


def build_tail_fill_sensor(interval_s: int,
                           jobs: Sequence["UnresolvedAssetJobDefinition"]) -> dg.SensorDefinition:
    """``tail_fill_sensor``, every ``interval_s`` seconds (``KTRDR_TAIL_FILL_INTERVAL``),
    requesting runs of the bar ``jobs``."""
    return dg.sensor(
        name="tail_fill_sensor", jobs=list(jobs), minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests runs for partitions whose stored bars end before the last "
                    "completed bar IB has (closed markets and holidays are not stale).",
    )(tail_fill)
