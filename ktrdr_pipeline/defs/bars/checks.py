"""Asset checks on every bar asset, per partition: OHLC validity (blocking), duplicates and
ordering, gaps against the exchange calendar, freshness of the newest period.

Checks read only what is stored (and the contract and head-timestamp caches written by
the loader); they never talk to IB. Failures list the offending rows in their metadata.
The four checks of a timeframe are one ``multi_asset_check`` (``bars_<tf>_checks``, each
check selectable on its own): it reads each partition once for all of them.
"""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from ...domain import calendars, gaps
from ...domain.bars import fetch_state
from ...domain.symbols import head_timestamp_cache_key
from ...domain.timeframes import Timeframe
from ...freshness import behind, completed_starts
from ...ib.contracts import JsonCache
from ...loader import default_use_rth
from ...settings import DEFAULT_PARTITIONS_START, pipeline_now
from ...store.parquet import BarStore
from ...store.schema import duplicate_or_unsorted, ohlc_violations, session_violations
from ..resources import KtrdrSettings
from .assets import bar_asset_key
from .partitions import bar_partitions, symbol_period

MAX_ROWS_SHOWN = 20


def _partitions(context: dg.AssetCheckExecutionContext) -> list[tuple[str, str]]:
    """The (symbol, period) partitions this check run covers: one, or every partition of a
    packed backfill run."""
    op_ctx = context.op_execution_context
    if op_ctx.has_partition_key:
        return [symbol_period(op_ctx.partition_key)]
    return [symbol_period(k) for k in op_ctx.partition_keys]


def _combine(results: list[tuple[str, dg.AssetCheckResult]],
             severity: dg.AssetCheckSeverity) -> dg.AssetCheckResult:
    """One partition's result as is; for a packed run, all partitions in one result."""
    if len(results) == 1:
        return results[0][1]
    failed = [(k, r) for k, r in results if not r.passed]
    meta: dict[str, object] = {
        "partitions": len(results),
        "failed_partitions": [k for k, _ in failed],
    }
    for k, r in failed[:3]:
        for name, value in r.metadata.items():
            meta[f"{k}: {name}"] = value
    return dg.AssetCheckResult(passed=not failed, severity=severity, metadata=meta)


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
        self.profile = calendars.profile_for(self.sec_type) if self.sec_type else None
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
    ("ohlc_valid", _ohlc_valid, True, dg.AssetCheckSeverity.ERROR,
     "Positive prices, low <= min(open, close) <= max(open, close) <= high, non-negative "
     "volume."),
    ("unique_sorted_in_session", _unique_sorted, False, dg.AssetCheckSeverity.ERROR,
     "No duplicate bars, sorted, every bar inside a session."),
    ("calendar_gaps", _calendar_gaps, False, dg.AssetCheckSeverity.WARN,
     "Sessions of the exchange calendar with missing bars."),
    ("fresh", _fresh, False, dg.AssetCheckSeverity.WARN,
     "The newest period holds the last completed bar IB has."),
)


def build_checks(tf: Timeframe,
                 start: str = DEFAULT_PARTITIONS_START) -> list[dg.AssetChecksDefinition]:
    """The checks of ``bars_<tf>`` (partitions from ``start``): one definition holding the
    four checks, which reads each partition once per evaluation."""
    asset_key = bar_asset_key(tf.name)
    partitions_def = bar_partitions(tf, start)
    specs = [dg.AssetCheckSpec(name, asset=asset_key, blocking=blocking,
                               description=description, partitions_def=partitions_def)
             for name, _, blocking, _, description in CHECKS]

    @dg.multi_asset_check(name=f"bars_{tf.name}_checks", specs=specs, can_subset=True,
                          description=f"The checks of bars_{tf.name}, from one read of "
                                      "each partition.")
    def _checks(context: dg.AssetCheckExecutionContext,
                ktrdr: KtrdrSettings) -> Iterator[dg.AssetCheckResult]:
        selected = {key.name for key in context.selected_asset_check_keys}
        data_dir = ktrdr.settings().data_dir
        views = [(f"{period}|{symbol}", PartitionView(data_dir, tf, symbol, period))
                 for symbol, period in _partitions(context)]
        for name, evaluate, _, severity, _ in CHECKS:
            if name not in selected:
                continue
            result = _combine([(label, evaluate(view)) for label, view in views], severity)
            yield dg.AssetCheckResult(
                check_name=name, asset_key=asset_key, passed=result.passed,
                severity=result.severity, metadata=result.metadata,
                description=result.description)

    return [_checks]
