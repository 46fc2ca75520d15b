"""Keeping the data current: the symbols sensor (the universe file <-> the ``symbols``
partitions) and the tail-fill sensor (runs for stale partitions); :func:`bar_partitions_in_flight`
tells the sensors and schedules which partitions a queued or running run or a backfill in
progress holds already."""

import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import dagster as dg
from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

from ...domain.symbols import check_storage_key
from ...freshness import stale_partitions
from ...settings import Settings, pipeline_now
from ...universe import add_entries, load_universe, remove_entries, universe_lock
from ..resources import KtrdrSettings
from .assets import bar_asset_key
from .jobs import bar_job_name
from .partitions import bar_partition_key, bar_partitions

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

log = logging.getLogger(__name__)

ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
          dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def _is_storage_key(key: str) -> bool:
    """Whether a partition key is a symbol's storage key, so the universe file can list it."""
    try:
        check_storage_key(key)
        return True
    except ValueError:
        return False


@dg.sensor(name="symbols_sensor", minimum_interval_seconds=60,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Keeps the 'symbols' partitions and the universe file in agreement: "
                       "applies the file's additions and removals, and adopts partitions "
                       "added (or deleted) in the UI into the file.")
def symbols_sensor(context: dg.SensorEvaluationContext, ktrdr: KtrdrSettings):
    """The universe file is the one source of truth; the cursor remembers the symbols on
    which the file and the partitions agreed at the last tick (``synced``), which tells
    who changed what since:

    - listed in the file, no partition: new in the file -> add the partition; but if it was
      synced, its partition was deleted (in the UI) -> take it out of the file;
    - a partition the file does not list: if it was synced, the file dropped it -> delete
      the partition; otherwise it was added outside the file (the UI) -> adopt it into the
      file. A partition key that is not a valid symbol cannot be listed: it is left alone
      and reported.

    A missing or unreadable file changes nothing (its symbols are unknown, not none)."""
    path = ktrdr.settings().universe_path
    synced = set(json.loads(context.cursor).get("synced", [])) if context.cursor else set()
    if not path.exists():
        return dg.SkipReason(f"no universe file at {path}; the 'symbols' partitions are left "
                             "as they are (`ktrdr-pipeline symbols add` creates the file)")
    with universe_lock(path):
        universe = load_universe(path)
        for error in universe.errors:
            context.log.warning(error)
        if universe.unreadable:
            return dg.SkipReason(f"{universe.errors[0]}; nothing changed")
        listed = set(universe.keys)
        # an entry skipped for a bad option still names its symbol: its partition is
        # neither removed nor adopted again while the user fixes the entry
        named = universe.listed
        current = set(context.instance.get_dynamic_partitions("symbols"))
        outside = sorted(current - named - synced)
        adopt = [k for k in outside if _is_storage_key(k)]
        foreign = [k for k in outside if k not in adopt]
        deleted_in_ui = sorted((listed - current) & synced)
        notes = []
        try:
            if adopt:
                add_entries(path, [(k, None) for k in adopt])
                notes.append(f"adopted {adopt} (added outside the file) into {path.name}")
            if deleted_in_ui:
                remove_entries(path, deleted_in_ui)
                notes.append(f"took {deleted_in_ui} (partitions deleted) out of {path.name}")
        except (OSError, ValueError) as exc:
            context.log.warning(f"cannot edit {path}: {exc}")
            notes.append(f"cannot edit {path}: {exc}")
            adopt, deleted_in_ui = [], []
        listed = (listed | set(adopt)) - set(deleted_in_ui)
    if foreign:
        notes.append(f"left alone {foreign}: not symbol keys the file could list")
    add = sorted(listed - current)
    remove = sorted((current - listed - named) & synced)
    cursor = json.dumps({"synced": sorted((listed | named) & current)})
    for note in notes:
        context.log.info(note)
    if not add and not remove:
        return dg.SensorResult(skip_reason=dg.SkipReason("; ".join(
            [f"{len(current)} symbols, as the universe file lists them", *notes])),
            cursor=cursor)
    requests = []
    if add:
        requests.append(dg.AddDynamicPartitionsRequest("symbols", add))
    if remove:
        requests.append(dg.DeleteDynamicPartitionsRequest("symbols", remove))
    context.log.info(f"symbols: adding {add}, removing {remove}")
    return dg.SensorResult(dynamic_partitions_requests=requests, cursor=cursor)


def partitions_in_flight(instance: dg.DagsterInstance,
                         partitions_defs: Mapping[str, dg.PartitionsDefinition],
                         job_assets: Mapping[str, str] | None = None,
                         asset_graph: Any = None) -> dict[str, set[str]]:
    """Per asset (of ``partitions_defs``, by name): the partition keys a queued or running
    run holds — one partition, or every key of a packed run's range (``dagster/
    asset_partition_range_start``/``_end``, expanded by the asset's partitions definition:
    a multi-partition range spans every symbol and period between its ends) — and those a
    backfill still in progress targets and has not materialized or failed yet.
    ``job_assets`` maps a job to its asset for runs and job backfills without an asset
    selection; ``asset_graph`` reads backfills stored in the old serialized form."""
    held: dict[str, set[str]] = {name: set() for name in partitions_defs}
    job_assets = job_assets or {}

    def assets_of(keys: Any, job_name: str | None) -> list[str]:
        names = [k.to_user_string() for k in keys or []]
        if not names and job_name in job_assets:
            names = [job_assets[job_name]]
        return [n for n in names if n in held]

    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=ACTIVE)):
        run = record.dagster_run
        one = run.tags.get("dagster/partition")
        first = run.tags.get("dagster/asset_partition_range_start")
        last = run.tags.get("dagster/asset_partition_range_end")
        for name in assets_of(run.asset_selection, run.job_name):
            if one:
                held[name].add(one)
            elif first and last:
                held[name].update(_expand(partitions_defs[name], first, last, instance))
    for backfill in instance.get_backfills(
            filters=BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED])):
        if not backfill.is_asset_backfill:
            for name in assets_of(None, backfill.job_name):
                held[name].update(backfill.partition_names or [])
            continue
        data = backfill.asset_backfill_data
        if data is None and asset_graph is not None:
            data = backfill.get_asset_backfill_data(asset_graph)
        if data is None:
            log.warning("backfill %s: cannot read its partitions", backfill.backfill_id)
            continue
        for key, subset in data.target_subset.partitions_subsets_by_asset_key.items():
            name = key.to_user_string()
            if name not in held:
                continue
            settled: set[str] = set()
            for done in (data.materialized_subset, data.failed_and_downstream_subset):
                part = done.partitions_subsets_by_asset_key.get(key)
                settled.update(part.get_partition_keys() if part is not None else [])
            held[name].update(set(subset.get_partition_keys()) - settled)
    return held


def _expand(partitions_def: dg.PartitionsDefinition, first: str, last: str,
            instance: dg.DagsterInstance) -> set[str]:
    try:
        return set(partitions_def.get_partition_keys_in_range(
            dg.PartitionKeyRange(first, last), dynamic_partitions_store=instance))
    except Exception as exc:  # a range Dagster cannot expand (a key deleted since)
        log.warning("cannot expand the partition range %s..%s: %s", first, last, exc)
        return {first, last}


def bar_partitions_in_flight(instance: dg.DagsterInstance, settings: Settings,
                             asset_graph: Any = None) -> dict[str, set[str]]:
    """:func:`partitions_in_flight` for the bar assets of ``settings``' timeframes."""
    timeframes = settings.enabled_timeframes()
    return partitions_in_flight(
        instance,
        {bar_asset_key(tf.name).to_user_string(): bar_partitions(tf, settings.partitions_start)
         for tf in timeframes},
        {bar_job_name(tf.name): bar_asset_key(tf.name).to_user_string() for tf in timeframes},
        asset_graph)


def asset_graph_of(context: Any) -> Any:
    """The asset graph of the definitions a sensor or schedule runs in (None in a test
    context built without them)."""
    try:
        repo = context.repository_def
    except Exception:  # a test context built without definitions
        return None
    return repo.asset_graph if repo is not None else None


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
    held = bar_partitions_in_flight(context.instance, settings, asset_graph_of(context))
    runs, busy = [], 0
    for item in stale:
        asset = f"bars_{item.timeframe}"
        key = bar_partition_key(item.symbol, item.period)
        target = item.last_expected.isoformat() if item.last_expected else "initial"
        slot = f"{asset}|{key}"
        if str(key) in held.get(asset, ()):
            busy += 1  # a queued or running run, or a backfill in progress, holds it
            continue
        if cursor.get(slot) == target:
            continue  # already requested
        cursor[slot] = target
        runs.append(dg.RunRequest(run_key=f"{slot}|{target}", partition_key=key,
                                  job_name=bar_job_name(item.timeframe),
                                  asset_selection=[bar_asset_key(item.timeframe)],
                                  tags={"ktrdr/trigger": "tail_fill_sensor"}))
    if not runs:
        return dg.SensorResult(skip_reason=dg.SkipReason(
            f"{len(stale)} stale partition(s): {busy} held by a queued or running run or a "
            "backfill in progress, the others already requested"), cursor=json.dumps(cursor))
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
