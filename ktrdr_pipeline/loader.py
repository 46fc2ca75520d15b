"""Gap-aware loading of one partition (symbol × timeframe × period): the core of the bar
assets and of ``ktrdr-pipeline load``.

Per partition: read what is stored; compare it with the bars the instrument's sessions
should have in that period (clamped to the head timestamp and to now); fetch only the
missing segments (tail, backfill and inner gaps alike); merge with the stored bars (a newer
fetch wins, so a partial bar is replaced), validate, and write atomically. A complete
partition makes no IB request at all.

**Bars IB does not have.** TRADES bars exist only where something traded, so a thin
instrument's sessions have holes no request can fill. A missing bar that an answered
request covered, and that had closed at least :data:`HOLE_SETTLE` before it, is recorded
in the partition's metadata (``empty_runs``) and counts as present from then on, so later
fills do not ask for it again; mode ``full`` forgets them and asks afresh. ``asked_until``
records up to when IB was last asked, so freshness checks do not chase a bar that never
traded.

**Bars outside the calendar.** IB's data is the truth: a bar IB serves outside every
session of the instrument's calendar (:mod:`ktrdr_pipeline.domain.calendars`) never fails
a load. It is stored, counted (``bars_outside_sessions`` in the result and the
materialization metadata, one warning per load) and listed by the WARN asset check of
that name; it is never an expected bar, so it neither fills nor hides a gap.

**Concurrent writers.** The fetch holds no lock (it may take minutes); the merge, the
validation and the write run under the partition's write lock
(:meth:`~ktrdr_pipeline.store.parquet.BarStore.locked`) and start by re-reading the
partition's metadata: when another writer (a load of another window of the month, a
Dagster run) wrote since this load planned, its bars and its fetch record are re-read and
merged with this load's, so neither loses the other's bars. The merged record keeps both:
this load's knowledge inside its window, the other writer's outside it (empty runs, the
bar in progress), and the later ``asked_until``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .domain import calendars, gaps, ib_rules
from .domain.bars import FetchState, PartitionMeta, empty_bars, fetch_state
from .domain.ib_rules import PacingLimits
from .domain.planning import plan_ranges
from .domain.symbols import parse_symbol
from .domain.timeframes import Timeframe, get_timeframe
from .ib.connection import IBConnection
from .ib.contracts import ContractResolver, HeadTimestamps
from .ib.errors import ErrorKind, IBError
from .ib.fetch import HistoricalFetcher
from .ib.governor import PacingGovernor
from .ib.ledger import SqlitePacingLedger
from .settings import Settings
from .store.parquet import BarStore
from .store.schema import outside_session_bars, validate_bars
from .universe import load_universe

log = logging.getLogger(__name__)

MODES = ("fill", "full")
#: A missing bar is taken as "IB has none" only when an answered request covered it at
#: least this long after the bar closed (IB publishes the newest bars with a short delay).
HOLE_SETTLE = timedelta(minutes=15)


class LoadError(Exception):
    """A partition cannot be loaded as asked (the message says why and what to do)."""


def default_use_rth(sec_type: str) -> bool:
    """Regular hours only for stocks (and their options); all hours for 24-hour markets."""
    return sec_type in ("STK", "OPT", "IND")


@dataclass
class PartitionResult:
    symbol: str
    timeframe: str
    period: str
    status: str = "ok"  # ok | complete | empty | no_data
    #: Why nothing (more) could be loaded, in a user's words ("" when bars were loaded).
    reason: str = ""
    cached_before: int = 0
    expected_bars: int = 0
    gaps_found: int = 0
    gaps_filled: int = 0
    missing_bars: int = 0
    known_empty_bars: int = 0
    #: Stored bars outside every session of the calendar: IB served them, so they are
    #: kept (the calendar may lag behind IB) and listed by the bars_outside_sessions check.
    bars_outside_sessions: int = 0
    segments_fetched: int = 0
    ib_requests_made: int = 0
    fetched_bars: int = 0
    bars_written: int = 0
    rows: int = 0
    first_bar: str | None = None
    last_bar: str | None = None
    use_rth: bool = True
    what_to_show: str = "TRADES"
    preview: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PipelineContext:
    """Everything the loader needs, built once per process from the settings."""

    settings: Settings
    store: BarStore
    connection: IBConnection
    governor: PacingGovernor
    fetcher: HistoricalFetcher
    resolver: ContractResolver
    heads: HeadTimestamps
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    rth_overrides: dict[str, bool] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # partition key -> contract form

    @classmethod
    def from_settings(cls, settings: Settings, *, client_id: int | None = None,
                      clock: Callable[[], datetime] | None = None,
                      rth_overrides: dict[str, bool] | None = None,
                      fetch_timeout_s: float = 120.0) -> PipelineContext:
        data_dir = Path(settings.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        universe = load_universe(settings.universe_path)
        if client_id is not None:
            settings = dataclasses.replace(settings, ib_client_id=client_id)
        conn = IBConnection.from_settings(settings)
        ledger = SqlitePacingLedger(data_dir / "pacing.sqlite")
        governor = PacingGovernor(ledger, PacingLimits(time_scale=settings.pacing_time_scale),
                                  max_open_large=settings.max_concurrent_large)
        return cls(
            settings=settings, store=BarStore(data_dir), connection=conn, governor=governor,
            fetcher=HistoricalFetcher(conn, governor, timeout_s=fetch_timeout_s,
                                      max_bars=settings.max_bars_per_request),
            resolver=ContractResolver(conn, data_dir),
            heads=HeadTimestamps(conn, governor, data_dir),
            clock=clock or conn.server_now,
            rth_overrides={**universe.rth_overrides(), **(rth_overrides or {})},
            aliases={e.key: e.contract for e in universe.entries if e.contract != e.key},
        )

    async def close(self) -> None:
        await self.connection.disconnect()


def expected_but_missing(exp_start: np.ndarray, stored_starts: np.ndarray,
                         state: FetchState) -> np.ndarray:
    """Which expected bars are neither stored nor known to be empty at IB."""
    return ~gaps.present(exp_start, stored_starts, state.empty_runs)


def newest_unasked(exp_start: np.ndarray, exp_end: np.ndarray, stored_starts: np.ndarray,
                   state: FetchState) -> int | None:
    """Index of the newest expected bar that is missing and that IB has not been asked for
    since it closed (None: the partition is as current as IB can make it)."""
    missing = expected_but_missing(exp_start, stored_starts, state)
    asked = state.asked_until
    if asked is not None:
        missing &= exp_end > asked
    found = np.flatnonzero(missing)
    return int(found[-1]) if len(found) else None


async def load_partition(ctx: PipelineContext, symbol: str, timeframe: str | Timeframe,
                         period: str, mode: str = "fill",
                         progress: Callable[[int, int], None] | None = None,
                         window: tuple[datetime, datetime] | None = None) -> PartitionResult:
    """Bring one partition up to date; see the module docstring. ``window`` limits the
    bars considered (and fetched) to [start, end) inside the period; the partition's other
    stored bars are kept as they are."""
    tf = get_timeframe(timeframe) if isinstance(timeframe, str) else timeframe
    if mode not in MODES:
        raise LoadError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    p_start, p_end = tf.period_bounds(period)
    if window is not None:
        p_start, p_end = max(p_start, window[0]), min(p_end, window[1])
    key = parse_symbol(symbol).key
    contract = await ctx.resolver.resolve(ctx.aliases.get(key, symbol), key=key)
    use_rth = ctx.rth_overrides.get(key, default_use_rth(contract.sec_type))
    what = contract.what_to_show
    result = PartitionResult(key, tf.name, period, use_rth=use_rth, what_to_show=what)
    stored, meta = ctx.store.read_with_meta(tf.name, key, period)
    first_read = stored
    state = fetch_state(meta)
    _check_rth(meta, use_rth, mode, f"{key} {tf.name} {period}")
    await ctx.connection.ensure_connected()  # also measures IB's clock
    if mode == "full":  # re-fetch the window: what is stored inside it is replaced (the
        stored = empty_bars()  # bars outside it are kept by the merge)
    result.cached_before = len(stored)
    now = ctx.clock()
    profile = contract.profile
    try:
        head = await ctx.heads.get(contract, what, use_rth)
    except IBError as exc:
        if exc.kind is not ErrorKind.NO_DATA:
            raise
        result.status = "no_data"
        return result
    oldest = now - ib_rules.SMALL_BAR_HISTORY if ib_rules.is_small_bar(tf.bar_size) else None
    if p_start >= now or p_end <= head or p_start >= p_end or (
            oldest is not None and p_end <= oldest):
        if p_start >= now:
            result.reason = (f"{period} is after the gateway's clock "
                             f"({now:%Y-%m-%d %H:%M} UTC): no bars yet")
        elif p_end <= head:
            result.reason = f"{period} is before IB's earliest data for {key} ({head.date()})"
        elif oldest is not None and p_end <= oldest:
            result.reason = (f"{period} is older than IB keeps {tf.bar_size} bars (about "
                             f"{ib_rules.SMALL_BAR_HISTORY.days} days, since {oldest.date()})")
            # the session's bars stay missing (not "IB answered without"): nothing is asked
            exp_start, _ = gaps.expected_bars(profile, tf.bar_size, p_start, p_end, use_rth,
                                              head=head, now=now)
            stored_s = stored.index.asi8 // 10**9 if len(stored) else np.empty(0, np.int64)
            result.expected_bars = len(exp_start)
            result.missing_bars = int((~np.isin(exp_start, stored_s)).sum())
        result.status = "complete" if len(stored) else "empty"
        _finish(result, stored)
        return result
    if oldest is not None:  # IB has none older: they are not expected, nor asked for
        p_start = max(p_start, oldest)
    exp_start, exp_end = gaps.expected_bars(profile, tf.bar_size, p_start, p_end, use_rth,
                                            head=head, now=now)
    result.expected_bars = len(exp_start)
    stored_s = (stored.index.asi8 // 10**9) if len(stored) else np.empty(0, np.int64)
    partial_from = state.partial_from
    if partial_from is not None and mode != "full":
        stored_s = stored_s[stored_s < partial_from]  # a stored partial bar is a gap
    lo_s, hi_s = int(p_start.timestamp()), math.ceil(p_end.timestamp())
    old_runs = list(state.empty_runs)
    trusted_runs = [] if mode == "full" else old_runs  # full mode asks again
    known_empty = gaps.in_runs(exp_start, trusted_runs)
    segments = gaps.missing_segments(exp_start, exp_end, stored_s, trusted_runs)
    tail_partial = _in_progress_bar_missing(tf, exp_end, p_start, p_end, now, profile,
                                            use_rth, head)
    if tail_partial is not None:
        if segments and segments[-1].end >= tail_partial.start:
            last = segments.pop()  # the bar in progress continues the last gap: one segment
            tail_partial = gaps.Segment(last.start, tail_partial.end, last.bars + 1)
        segments.append(tail_partial)
    result.gaps_found = len(segments)
    result.missing_bars = sum(s.bars for s in segments)
    result.known_empty_bars = int(known_empty.sum())
    if not segments:
        result.status = "complete"
        _count_outside(result, stored, tf, profile, use_rth)
        _finish(result, stored)
        return result
    plan = plan_ranges(profile, tf.bar_size,
                       [(seg.start, min(seg.end, p_end)) for seg in segments], what, use_rth,
                       head_timestamp=head, now=now,
                       max_bars=ctx.settings.max_bars_per_request)
    log.info("%s %s %s: %d stored, %d gap(s) with %d missing bar(s), %d IB request(s)", key,
             tf.name, period, len(stored), len(segments), result.missing_bars, len(plan))
    fetched = await ctx.fetcher.fetch(contract.contract(), plan, progress)
    frame = fetched.frame
    frame = frame[(frame.index >= p_start) & (frame.index < p_end)]  # the window, if any
    if tf.is_daily_or_larger:
        frame = frame[frame.index >= pd.Timestamp(head.date(), tz=UTC)]
    else:
        frame = frame[frame.index >= head]
    result.segments_fetched = len(segments)
    result.ib_requests_made = fetched.requests_made
    result.fetched_bars = len(frame)
    # read-merge-validate-write under the partition's lock, onto what is stored *now*
    with ctx.store.locked(tf.name, key, period):
        current, current_meta = _reread(ctx.store, tf.name, key, period, first_read, meta)
        _check_rth(current_meta, use_rth, mode, f"{key} {tf.name} {period}")
        current_state = fetch_state(current_meta)
        in_window = (current.index >= p_start) & (current.index < p_end)
        if mode == "full":  # what is stored inside the window is replaced
            kept = current[~in_window]
        else:  # a newer fetch wins
            kept = current[~current.index.isin(frame.index)]
        merged = pd.concat([kept, frame]).sort_index()
        merged_in_window = (merged.index >= p_start) & (merged.index < p_end)
        partial_from = current_state.partial_from
        if partial_from is not None and mode != "full":
            # a partial bar inside the window the new fetch did not return again stays
            # only if still in progress (outside the window this load asked nothing)
            stale = ((merged.index.asi8 // 10**9 >= partial_from)
                     & ~merged.index.isin(frame.index) & merged_in_window)
            merged = merged[~stale]
            merged_in_window = (merged.index >= p_start) & (merged.index < p_end)
        validate_bars(merged, tf, profile, use_rth)  # bars outside sessions are valid
        merged_s = merged.index.asi8 // 10**9
        new_partial = _merged_partial(merged[merged_in_window], exp_start, partial_from,
                                      merged_s, lo_s, hi_s, tf, int(now.timestamp()))
        present = np.isin(exp_start, merged_s)
        # every request was answered: a bar one of them covered that is still missing and
        # had long closed, IB does not have (bars no request covered — older than IB
        # keeps, say — stay missing); another writer's empty runs count as well
        settled = _asked(plan, exp_start, exp_end, tf) & (
            exp_end <= int((now - HOLE_SETTLE).timestamp()))
        if mode != "full":
            known_empty = known_empty | gaps.in_runs(exp_start, list(current_state.empty_runs))
        known_empty = (known_empty | settled) & ~present
        result.known_empty_bars = int(known_empty.sum())
        runs = sorted(gaps.runs_outside(list(current_state.empty_runs), lo_s, hi_s)
                      + gaps.runs_of(exp_start, exp_end, known_empty))
        resolved = present | known_empty
        after = set(merged_s)
        result.gaps_filled = sum(
            1 for seg in segments
            if _segment_resolved(seg, exp_start, resolved, after))
        asked_until = min(int(now.timestamp()),
                          max(int(seg.end.timestamp()) for seg in segments))
        if not len(merged) and current_meta is None:
            # nothing stored and IB answered with no bars: no empty file, and say so
            result.status = "empty"
            result.reason = (f"IB answered {len(plan)} request(s) for {key} {tf.name} "
                             f"{period} with no bars")
            _finish(result, merged)
            return result
        ctx.store.write(tf.name, key, period, merged, use_rth=use_rth, what_to_show=what,
                        fetch=FetchState(con_id=str(contract.con_id),
                                         fetched_at=now.isoformat(),
                                         partial_from=new_partial,
                                         asked_until=max(asked_until,
                                                         current_state.asked_until or 0),
                                         empty_runs=tuple(runs)))
    result.bars_written = len(merged)
    _count_outside(result, merged, tf, profile, use_rth)
    _finish(result, merged)
    return result


def _check_rth(meta: PartitionMeta | None, use_rth: bool, mode: str, what: str) -> None:
    """Refuse to mix regular-hours and all-hours bars in one partition (mode ``full``
    re-fetches and may switch)."""
    if meta is None or mode == "full" or meta.use_rth == use_rth:
        return
    raise LoadError(
        f"{what} is stored with useRTH={int(meta.use_rth)} but this load asks for "
        f"useRTH={int(use_rth)}; mixing them is refused — re-fetch the period with mode "
        f"'full' to switch")


def _reread(store: BarStore, tf: str, key: str, period: str, first_read: pd.DataFrame,
            first_meta: PartitionMeta | None) -> tuple[pd.DataFrame, PartitionMeta | None]:
    """The partition as stored now (called under its lock): one metadata read when
    nobody wrote it since ``first_meta`` was read (the bars read then are still current;
    every write stamps ``written_at``), otherwise the whole file again."""
    now_meta = store.read_meta(tf, key, period)
    if now_meta == first_meta:
        return first_read, first_meta
    log.info("%s %s %s was written by another writer while this load fetched; merging "
             "onto its %d bar(s)", key, tf, period, now_meta.rows if now_meta else 0)
    return store.read_with_meta(tf, key, period)


def _merged_partial(window_bars: pd.DataFrame, exp_start: np.ndarray,
                    stored_partial: int | None, merged_s: np.ndarray, lo_s: int,
                    hi_s: int, tf: Timeframe, now_s: int) -> int | None:
    """``partial_from`` of the merged partition: the bar in progress this load fetched
    (only bars of its window can be: later stored bars are not "later than every expected
    bar" of a window that ends before them), else a bar in progress another load stored
    outside this window, if it is still there."""
    ours = _partial_start(window_bars, exp_start, tf, now_s)
    theirs = (stored_partial if stored_partial is not None
              and not lo_s <= stored_partial < hi_s and bool((merged_s == stored_partial).any())
              else None)
    found = [p for p in (ours, theirs) if p is not None]
    return min(found) if found else None


def _asked(plan: list, exp_start: np.ndarray, exp_end: np.ndarray,
           tf: Timeframe) -> np.ndarray:
    """Which expected bars a request of ``plan`` covered: an intraday bar by its start, a
    daily or larger one (keyed by session date) by its session's close."""
    covers = sorted((int(r.covers[0].timestamp()), math.ceil(r.covers[1].timestamp()))
                    for r in plan)
    if tf.is_daily_or_larger:  # close in (c0, c1]
        return gaps.in_runs(exp_end - 1, covers)
    return gaps.in_runs(exp_start, covers)


def _segment_resolved(seg: gaps.Segment, exp_start: np.ndarray, resolved: np.ndarray,
                      stored: set[int]) -> bool:
    """Whether no expected bar of ``seg`` is still missing (the bar in progress, which is
    not expected yet, counts when it came back)."""
    lo, hi = seg.start.timestamp(), seg.end.timestamp()
    inside = (exp_start >= lo) & (exp_start < hi)
    if inside.any():
        return bool(resolved[inside].all())
    return int(lo) in stored


def _in_progress_bar_missing(tf: Timeframe, exp_end: np.ndarray,
                             p_start: datetime, p_end: datetime, now: datetime,
                             profile: calendars.HoursProfile, use_rth: bool,
                             head: datetime) -> gaps.Segment | None:
    """The bar in progress (market open now, inside this period) as a one-bar segment, so
    a tail fill brings it in; its stored copy is always refreshed."""
    if not (p_start <= now < p_end):
        return None
    session = calendars.session_at(profile, now, use_rth)
    if session is None:
        return None
    last_closed = int(exp_end[-1]) if len(exp_end) else int(max(session.open, head).timestamp())
    start = datetime.fromtimestamp(max(last_closed, int(session.open.timestamp())), UTC)
    if tf.is_daily_or_larger:
        start = session.open
    if start >= now:
        return None
    return gaps.Segment(start, now + timedelta(seconds=1), 1)


def _partial_start(frame: pd.DataFrame, exp_start: np.ndarray, tf: Timeframe,
                   now_s: int) -> int | None:
    """Epoch of the stored bar that had not closed when it was fetched (the bar in
    progress): a bar later than every bar expected to have closed by now that could still
    be open (it started less than a bar's length ago; a bar IB served outside the
    calendar's sessions after the last expected one has long closed)."""
    if not len(frame):
        return None
    ts = frame.index.asi8 // 10**9
    later = ts[ts > int(exp_start[-1])] if len(exp_start) else ts
    if not tf.is_daily_or_larger:
        later = later[later + tf.seconds > now_s]
    return int(later[0]) if len(later) else None


def _count_outside(result: PartitionResult, frame: pd.DataFrame, tf: Timeframe,
                   profile: calendars.HoursProfile, use_rth: bool) -> None:
    """Count the partition's bars outside every session and say so once per load."""
    outside = outside_session_bars(frame, tf, profile, use_rth) if len(frame) else frame
    result.bars_outside_sessions = len(outside)
    if len(outside):
        log.warning("%s %s %s: %d bar(s) outside the %s calendar's sessions, first at %s; "
                    "stored as IB served them (see the bars_outside_sessions check)",
                    result.symbol, result.timeframe, result.period, len(outside),
                    profile.calendar, outside.index[0].isoformat())


def _finish(result: PartitionResult, frame: pd.DataFrame) -> None:
    result.rows = len(frame)
    if len(frame):
        result.first_bar = frame.index[0].isoformat()
        result.last_bar = frame.index[-1].isoformat()
        tail = frame.tail(5).reset_index()
        tail["ts"] = tail["ts"].astype(str)
        result.preview = tail.to_dict(orient="records")


@dataclass
class LoadSummary:
    """What ``ktrdr-pipeline load --json`` prints."""

    status: str
    symbol: str
    timeframe: str
    mode: str
    start: str
    end: str
    fetched_bars: int = 0
    cached_before: int = 0
    gaps_analyzed: int = 0
    segments_fetched: int = 0
    ib_requests_made: int = 0
    bars_written: int = 0
    partitions: list[str] = field(default_factory=list)
    error: str | None = None
    #: Why nothing of the range could be loaded (status ``empty`` or ``no_sessions``).
    reason: str | None = None
