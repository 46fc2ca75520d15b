"""Asset checks on every bar asset, per partition: OHLC validity (blocking), duplicates and
ordering, gaps against the exchange calendar, freshness of the newest period, and the bars
IB served outside the calendar's sessions (a warning: IB's data is the truth, the calendar
may lag behind it).

Checks read only what is stored (and the contract and head-timestamp caches written by
the loader); they never talk to IB. Failures list the offending rows in their metadata.
The five checks of a timeframe are one ``multi_asset_check`` (``bars_<tf>_checks``, each
check selectable on its own): it reads each partition once for all of them.

Every partition gets its own evaluation of each check, also in a packed backfill run (a
partition range): Dagster 1.13 gives an ``AssetCheckResult`` a partition only when the run
has a single partition key, so the checks emit ``AssetCheckEvaluation``s themselves, each
naming its partition and the materialization of that partition it judged.
"""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from ...domain import calendars, gaps
from ...domain.bars import fetch_state
from ...domain.symbols import head_timestamp_cache_key
from ...domain.timeframes import Timeframe
from ...freshness import behind, completed_starts
from ...ib.contracts import JsonCache, cached_profile
from ...loader import default_use_rth
from ...settings import DEFAULT_PARTITIONS_START, pipeline_now
from ...store.parquet import BarStore
from ...store.schema import (
    duplicate_or_unsorted,
    ohlc_violations,
    outside_session_bars,
    session_violations,
)
from ..resources import KtrdrSettings
from .assets import bar_asset_key
from .partitions import bar_partitions, symbol_period

MAX_ROWS_SHOWN = 20


def _partition_keys(context: dg.AssetCheckExecutionContext) -> list[str]:
    """The partition keys (``"PERIOD|SYMBOL"``) this check run covers: one, or every
    partition of a packed backfill run."""
    op_ctx = context.op_execution_context
    if op_ctx.has_partition_key:
        return [str(op_ctx.partition_key)]
    return [str(k) for k in op_ctx.partition_keys]


def latest_materialization(instance: dg.DagsterInstance, asset_key: dg.AssetKey,
                           partition: str) -> AssetCheckEvaluationTargetMaterializationData | None:
    """The partition's newest materialization, which its check evaluations judge: Dagster
    shows a check result as current for the partition only while it names that one."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1).records
    if not records:
        return None
    record = records[0]
    return AssetCheckEvaluationTargetMaterializationData(
        run_id=record.run_id, storage_id=record.storage_id, timestamp=record.timestamp)


def _rows_md(rows: pd.DataFrame) -> dg.MetadataValue:
    shown = rows.head(MAX_ROWS_SHOWN).reset_index()
    return dg.MetadataValue.md(shown.to_markdown(index=False) if hasattr(shown, "to_markdown")
                               else shown.to_string(index=False))


class PartitionView:
    """What is stored for one partition plus the cached contract facts."""

    def __init__(self, data_dir: Path, tf: Timeframe, symbol: str, period: str):
        self.tf, self.symbol, self.period = tf, symbol, period
        store = BarStore(data_dir)
        self.frame, meta = store.read_with_meta(tf.name, symbol, period)
        self.fetch = fetch_state(meta)
        contract = JsonCache(data_dir / "cache" / "contracts.json", float("inf")).get(symbol)
        self.sec_type = (contract or {}).get("sec_type")
        self.con_id = (contract or {}).get("con_id")
        self.profile = cached_profile(contract) if self.sec_type else None
        self.use_rth = meta.use_rth if meta is not None else default_use_rth(
            self.sec_type or "STK")
        self.head = None
        if self.con_id is not None:
            what = meta.what_to_show if meta is not None else "TRADES"
            cached = JsonCache(data_dir / "cache" / "head_timestamps.json", float("inf")).get(
                head_timestamp_cache_key(self.con_id, what, self.use_rth))
            self.head = datetime.fromisoformat(cached) if cached else None


def _violations(view: PartitionView, bad: pd.DataFrame) -> dg.AssetCheckResult:
    meta: dict[str, object] = {"rows": len(view.frame), "violations": len(bad)}
    if len(bad):
        meta["offending_rows"] = _rows_md(bad)
    return dg.AssetCheckResult(passed=not len(bad), metadata=meta,
                               severity=dg.AssetCheckSeverity.ERROR)


def _ohlc_valid(view: PartitionView) -> dg.AssetCheckResult:
    return _violations(view, ohlc_violations(view.frame))


def _unique_sorted(view: PartitionView) -> dg.AssetCheckResult:
    bad = duplicate_or_unsorted(view.frame)
    if view.profile is not None and len(view.frame):
        outside = session_violations(view.frame, view.tf, view.profile, view.use_rth)
        bad = pd.concat([bad, outside]) if len(outside) else bad
    return _violations(view, bad)


def _outside_sessions(view: PartitionView) -> dg.AssetCheckResult:
    """The stored bars outside every session of the instrument's calendar: kept (IB served
    them), listed so a user can see where the calendar and IB differ."""
    if view.profile is None or not len(view.frame):
        return dg.AssetCheckResult(passed=True, severity=dg.AssetCheckSeverity.WARN,
                                   metadata={"rows": len(view.frame), "outside_sessions": 0})
    outside = outside_session_bars(view.frame, view.tf, view.profile, view.use_rth)
    meta: dict[str, object] = {
        "rows": len(view.frame), "outside_sessions": len(outside),
        "calendar": f"{view.profile.calendar} ({view.profile.tz}, "
                    f"{'regular' if view.use_rth else 'all'} hours)"}
    if len(outside):
        meta["outside_session_bars"] = _rows_md(outside.drop(columns="check"))
        meta["dates"] = sorted({f"{t:%Y-%m-%d}" for t in outside.index.tz_convert(
            view.profile.tz)})[:100]
    return dg.AssetCheckResult(passed=not len(outside), metadata=meta,
                               severity=dg.AssetCheckSeverity.WARN)


def _calendar_gaps(view: PartitionView) -> dg.AssetCheckResult:
    tf = view.tf
    if view.profile is None:
        return dg.AssetCheckResult(passed=True, severity=dg.AssetCheckSeverity.WARN,
                                   description="contract unknown: not loaded yet")
    start, end = tf.period_bounds(view.period)
    fetched_at = view.fetch.fetched_at
    now = datetime.fromisoformat(fetched_at) if fetched_at else pipeline_now()
    exp_s, exp_e = gaps.expected_bars(view.profile, tf.bar_size, start, end, view.use_rth,
                                      head=view.head, now=now)
    stored = view.frame.index.asi8 // 10**9 if len(view.frame) else np.empty(0, np.int64)
    empty_runs = view.fetch.empty_runs
    known_empty = gaps.in_runs(exp_s, empty_runs)
    segments = gaps.missing_segments(exp_s, exp_e, stored, empty_runs)
    missing_sessions = sorted({
        s.date.isoformat()
        for seg in segments
        for s in calendars.sessions_between(view.profile, seg.start,
                                            max(seg.end, seg.start + timedelta(seconds=1)),
                                            view.use_rth)})
    return dg.AssetCheckResult(
        passed=not segments, severity=dg.AssetCheckSeverity.WARN,
        metadata={"expected_bars": len(exp_s), "missing_bars": sum(s.bars for s in segments),
                  "gaps": len(segments), "missing_sessions": missing_sessions[:100],
                  # asked for, answered without a bar: nothing traded (not a gap)
                  "known_empty_bars": int(known_empty.sum())})


def _fresh(view: PartitionView) -> dg.AssetCheckResult:
    tf = view.tf
    now = pipeline_now()
    start, end = tf.period_bounds(view.period)
    if not start <= now < end or view.profile is None:
        return dg.AssetCheckResult(passed=True, severity=dg.AssetCheckSeverity.WARN,
                                   description="not the current period")
    exp_s, exp_e = gaps.expected_bars(view.profile, tf.bar_size, start, end, view.use_rth,
                                      head=view.head, now=now)
    last_expected = datetime.fromtimestamp(int(exp_s[-1]), UTC) if len(exp_s) else None
    last_stored = view.frame.index[-1].to_pydatetime() if len(view.frame) else None
    # the same test as the tail-fill sensor's: behind only when a missing bar closed after
    # IB was last asked (a thin instrument's minute without a trade has no bar)
    ok = not behind(completed_starts(view.frame, view.fetch), view.fetch, exp_s, exp_e)
    return dg.AssetCheckResult(
        passed=ok, severity=dg.AssetCheckSeverity.WARN,
        metadata={"last_expected_bar": str(last_expected), "last_stored_bar": str(last_stored)})


CHECKS = (
    ("ohlc_valid", _ohlc_valid, True,
     "Positive prices, low <= min(open, close) <= max(open, close) <= high, non-negative "
     "volume."),
    ("unique_sorted_in_session", _unique_sorted, False,
     "No duplicate bars, sorted, every bar of a session on its bar grid."),
    ("calendar_gaps", _calendar_gaps, False,
     "Sessions of the exchange calendar with missing bars."),
    ("fresh", _fresh, False,
     "The newest period holds the last completed bar IB has."),
    ("bars_outside_sessions", _outside_sessions, False,
     "Bars IB served outside the exchange calendar's sessions (kept: IB's data is the "
     "truth; the calendar may lag behind it)."),
)


def build_checks(tf: Timeframe,
                 start: str = DEFAULT_PARTITIONS_START) -> list[dg.AssetChecksDefinition]:
    """The checks of ``bars_<tf>`` (partitions from ``start``): one definition holding the
    five checks, which reads each partition once per evaluation."""
    asset_key = bar_asset_key(tf.name)
    partitions_def = bar_partitions(tf, start)
    specs = [dg.AssetCheckSpec(name, asset=asset_key, blocking=blocking,
                               description=description, partitions_def=partitions_def)
             for name, _, blocking, description in CHECKS]

    @dg.multi_asset_check(name=f"bars_{tf.name}_checks", specs=specs, can_subset=True,
                          description=f"The checks of bars_{tf.name}, from one read of "
                                      "each partition.")
    def _checks(context: dg.AssetCheckExecutionContext,
                ktrdr: KtrdrSettings) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
        selected = {key.name for key in context.selected_asset_check_keys}
        data_dir = ktrdr.settings().data_dir
        partitions = []
        for partition in _partition_keys(context):
            symbol, period = symbol_period(partition)
            partitions.append((partition, PartitionView(data_dir, tf, symbol, period),
                               latest_materialization(context.instance, asset_key, partition)))
        for spec, (name, evaluate, blocking, _) in zip(specs, CHECKS, strict=True):
            if name not in selected:
                continue
            for partition, view, target in partitions:
                result = evaluate(view)
                # a failed blocking ERROR evaluation still fails the step (Dagster raises
                # once the step's events are out), as an AssetCheckResult would
                yield dg.AssetCheckEvaluation(
                    asset_key=asset_key, check_name=name, passed=result.passed,
                    metadata=result.metadata, severity=result.severity,
                    description=result.description, blocking=blocking, partition=partition,
                    target_materialization_data=target)
            # the check's output, as an AssetCheckResult yields it: the check ran
            yield dg.Output(None, output_name=spec.get_python_identifier())

    return [_checks]
