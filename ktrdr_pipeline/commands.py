"""The data commands behind the CLI: load, ranges, symbols (plain Python, testable)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from .domain import calendars
from .domain.symbols import parse_symbol
from .domain.timeframes import TIMEFRAMES, Timeframe, get_timeframe
from .loader import (
    LoadError,
    LoadSummary,
    PartitionResult,
    PipelineContext,
    default_use_rth,
    load_partition,
)
from .settings import Settings
from .universe import add_entries, remove_entries, universe_lock

log = logging.getLogger(__name__)

LOAD_MODES = ("tail", "backfill", "full")


def session_window(tf: Timeframe, profile: calendars.HoursProfile, first: date, last: date,
                   use_rth: bool) -> tuple[datetime, datetime] | None:
    """[start, end) covering the sessions dated ``first``..``last`` (inclusive); None when
    there is none."""
    sessions = calendars.sessions_on_dates(profile, first, last, use_rth)
    if not sessions:
        return None
    if tf.is_daily_or_larger:
        a, b = sessions[0].date, sessions[-1].date + timedelta(days=1)
        return (datetime(a.year, a.month, a.day, tzinfo=UTC),
                datetime(b.year, b.month, b.day, tzinfo=UTC))
    return sessions[0].open, sessions[-1].close


async def load(ctx: PipelineContext, symbol: str, timeframe: str, mode: str = "tail",
               start: date | None = None, end: date | None = None,
               progress: Callable[[str, int, int], None] | None = None,
               on_partition: Callable[[PartitionResult], None] | None = None) -> LoadSummary:
    """``ktrdr-pipeline load``: the asset code path over a range of session dates.

    An explicit ``start``/``end`` always defines the window, whatever the mode, and every
    missing bar inside it is fetched (inner gaps included). The mode only chooses the
    window's open sides: tail from the last stored bar to now, backfill from the head
    timestamp to the first stored bar (each the whole history when nothing is stored);
    full re-fetches every bar of the window (head timestamp to now by default).
    ``on_partition`` receives each partition's result as it is done."""
    if mode not in LOAD_MODES:
        raise LoadError(f"unknown mode {mode!r}; allowed: {', '.join(LOAD_MODES)}")
    tf = get_timeframe(timeframe)
    key = parse_symbol(symbol).key
    contract = await ctx.resolver.resolve(ctx.aliases.get(key, symbol), key=key)
    profile = contract.profile
    use_rth = ctx.rth_overrides.get(key, default_use_rth(contract.sec_type))
    head = await ctx.heads.get(contract, contract.what_to_show, use_rth)
    await ctx.connection.ensure_connected()
    now = ctx.clock()
    tz = ZoneInfo(profile.tz)
    today = now.astimezone(tz).date()
    # each side of the window with the words that say where it came from (for errors)
    first_day, first_is = (start, "--start") if start else (
        head.astimezone(tz).date(), "IB's earliest data")
    last_day, last_is = (end, "--end") if end else (today, "today")

    def bar_day(ts: datetime) -> date:  # daily and larger bars are keyed by session date
        return ts.astimezone(UTC).date() if tf.is_daily_or_larger else ts.astimezone(tz).date()

    stored = ctx.store.partitions(tf.name, key)
    if stored and mode in ("tail", "backfill") and (start is None or end is None):
        if mode == "tail" and start is None:
            bars = ctx.store.read(tf.name, key, stored[-1][2])
            if len(bars):
                first_day, first_is = bar_day(bars.index[-1].to_pydatetime()), \
                    "the last stored bar"
        elif mode == "backfill" and end is None:
            bars = ctx.store.read(tf.name, key, stored[0][2])
            if len(bars):
                last_day, last_is = bar_day(bars.index[0].to_pydatetime()), \
                    "the first stored bar"
    if first_day > last_day:
        raise LoadError(f"{first_is} {first_day} is after {last_is} {last_day}: nothing to "
                        f"load in {mode} mode")
    summary = LoadSummary(status="ok", symbol=key, timeframe=tf.name, mode=mode,
                          start=first_day.isoformat(), end=last_day.isoformat())
    window = session_window(tf, profile, first_day, last_day, use_rth)
    if window is None:
        summary.status = "no_sessions"
        summary.reason = (f"no trading session of {key} from {first_day} to {last_day} "
                          "(a closed market or holidays)")
        return summary
    periods = tf.periods_between(window[0], window[1])
    summary.partitions = periods
    results: list[PartitionResult] = []
    for k, period in enumerate(periods):
        def on_progress(done: int, total: int, _p: str = period) -> None:
            if progress is not None:
                progress(_p, done, total)

        result = await load_partition(ctx, key, tf, period,
                                      "full" if mode == "full" else "fill", on_progress, window)
        summary.fetched_bars += result.fetched_bars
        summary.cached_before += result.cached_before
        summary.gaps_analyzed += result.gaps_found
        summary.segments_fetched += result.segments_fetched
        summary.ib_requests_made += result.ib_requests_made
        summary.bars_written += result.bars_written
        results.append(result)
        if on_partition is not None:
            on_partition(result)
        if progress is not None:
            progress(period, k + 1, len(periods))
    if not any(r.rows for r in results):  # nothing of the range could be loaded: say why
        summary.status = "empty"
        summary.reason = "; ".join(dict.fromkeys(r.reason for r in results if r.reason)) or (
            f"IB has no {tf.name} bars of {key} from {first_day} to {last_day}")
    return summary


async def ranges(ctx: PipelineContext, symbol: str) -> dict[str, Any]:
    """IB's earliest available data and what is stored, per timeframe."""
    key = parse_symbol(symbol).key
    contract = await ctx.resolver.resolve(ctx.aliases.get(key, symbol), key=key)
    use_rth = ctx.rth_overrides.get(key, default_use_rth(contract.sec_type))
    head = await ctx.heads.get(contract, contract.what_to_show, use_rth)
    stored: dict[str, Any] = {}
    for part in ctx.store.entries(symbol=key):  # the manifest: no Parquet file is opened
        entry = stored.setdefault(part.timeframe, {"first_bar": None, "last_bar": None,
                                                   "rows": 0, "partitions": 0})
        entry["partitions"] += 1
        entry["rows"] += part.rows
        if part.rows:
            entry["first_bar"] = entry["first_bar"] or part.as_datetime(
                part.first_bar).isoformat()
            entry["last_bar"] = part.as_datetime(part.last_bar).isoformat()
    return {"symbol": key, "con_id": contract.con_id, "sec_type": contract.sec_type,
            "local_symbol": contract.local_symbol, "what_to_show": contract.what_to_show,
            "use_rth": use_rth, "ib_earliest": head.isoformat(), "stored": stored,
            "timeframes": list(TIMEFRAMES)}


def dagster_instance(settings: Settings):
    """The Dagster instance: ``DAGSTER_HOME``, or ``KTRDR_DATA_DIR/dagster`` when unset.
    Use it in a ``with`` block: an instance left to the garbage collector restores Dagster's
    context-wide state storage out of order when it is finally disposed."""
    import dagster as dg

    home = settings.dagster_instance_home
    home.mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.from_config(str(home))


def symbol_partitions(settings: Settings) -> list[str]:
    with dagster_instance(settings) as instance:
        return sorted(instance.get_dynamic_partitions("symbols"))


async def add_symbols(ctx: PipelineContext, symbols: list[str]) -> dict[str, dict[str, Any]]:
    """Validate and discover each symbol through IB; add the good ones to the universe file
    (the one source of truth, which the symbols sensor applies) and as partitions now, so
    they can be materialized at once. An explicit contract (``ES:FUT:CME``) is kept in the
    entry; a symbol the file lists already keeps its entry."""
    outcomes = await ctx.resolver.validate_many(symbols)
    good = {o["contract"]["key"]: text for text, o in outcomes.items() if o["ok"]}
    if good:
        path = ctx.settings.universe_path
        with universe_lock(path):
            add_entries(path, sorted(good.items()))
            with dagster_instance(ctx.settings) as instance:
                existing = set(instance.get_dynamic_partitions("symbols"))
                new = sorted(set(good) - existing)
                if new:
                    instance.add_dynamic_partitions("symbols", new)
    return outcomes


def remove_symbols(settings: Settings, symbols: list[str]) -> list[str]:
    """Remove the symbols from the universe file and their partitions; the keys that were
    in either (the stored bars stay)."""
    keys = list(dict.fromkeys(parse_symbol(s).key for s in symbols))
    path = settings.universe_path
    with universe_lock(path):
        listed = set(remove_entries(path, keys))
        with dagster_instance(settings) as instance:
            existing = set(instance.get_dynamic_partitions("symbols"))
            for k in keys:
                if k in existing:
                    instance.delete_dynamic_partition("symbols", k)
    return [k for k in keys if k in listed or k in existing]


def summary_dict(summary: LoadSummary) -> dict[str, Any]:
    return dataclasses.asdict(summary)
