"""Which stored partitions are behind the market (pure logic over the store).

A partition is stale when its stored bars end before the last *completed* bar IB should
have for the instrument (per its exchange calendar) and IB has not been asked for that bar
since it closed: a closed market or a holiday is not stale, and neither is a thin
instrument's minute without a trade (asked for, no bar, see :mod:`ktrdr_pipeline.loader`).
The contract facts come from the resolver's cache; a symbol never loaded is stale from the
start (its current period needs an initial load). What is stored comes from the store's
partition manifest (:mod:`ktrdr_pipeline.store.manifest`), not from the Parquet files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from .domain import calendars, gaps
from .domain.bars import FetchState, fetch_state
from .domain.timeframes import Timeframe
from .ib.contracts import JsonCache, cached_profile
from .loader import default_use_rth, newest_unasked
from .store.parquet import BarStore


@dataclass(frozen=True)
class StalePartition:
    timeframe: str
    symbol: str
    period: str
    last_expected: datetime | None  # the newest bar IB should have (None: unknown contract)
    last_stored: datetime | None


def recent_expected_bars(profile: calendars.HoursProfile, tf: Timeframe, use_rth: bool,
                         now: datetime) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (epoch seconds) of the bars closed by ``now`` over a look-back that
    always reaches the previous session."""
    lookback = timedelta(days=40 if tf.is_daily_or_larger else 12)
    if tf.bar_size in ("1 week", "1 month"):
        lookback = timedelta(days=70)
    return gaps.expected_bars(profile, tf.bar_size, now - lookback, now, use_rth, now=now)


def completed_starts(frame: pd.DataFrame, state: FetchState) -> np.ndarray:
    """Starts (epoch seconds) of the stored bars that had closed when fetched: the bar
    still in progress then does not count."""
    stored = frame.index.asi8 // 10**9 if len(frame) else np.empty(0, np.int64)
    partial = state.partial_from
    return stored[stored < partial] if partial is not None else stored


def behind(completed: np.ndarray, state: FetchState, exp_start: np.ndarray,
           exp_end: np.ndarray) -> bool:
    """Whether a partition lacks a closed bar (``exp_start``/``exp_end``: the bars its
    period should have by now; ``completed``: :func:`completed_starts`) that IB has not
    been asked for since it closed."""
    # the newest expected bar is stored: current (a later stored bar is not enough — IB may
    # have served it outside the calendar's sessions)
    if not len(exp_start) or bool(np.isin(exp_start[-1], completed)):
        return False
    return newest_unasked(exp_start, exp_end, completed, state) is not None


def tail_behind(last_completed: int | None, state: FetchState, exp_start: np.ndarray,
                exp_end: np.ndarray) -> bool | None:
    """:func:`behind` from what the manifest keeps instead of every stored bar:
    ``last_completed`` (epoch s), the newest stored bar that had closed when fetched.

    Every expected bar after it is missing, so the answer is known unless the bars after it
    are all accounted for (known empty, or asked for since they closed) while a bar before
    it closed after IB was last asked (an inner gap, only possible when ``asked_until`` is
    unknown or older than the last completed bar): then None, and the caller asks
    :func:`behind` with the stored bars."""
    if not len(exp_start) or (last_completed is not None and last_completed >= exp_start[-1]):
        return False
    tail = exp_start > last_completed if last_completed is not None else np.ones(
        len(exp_start), bool)
    unasked = exp_end > state.asked_until if state.asked_until is not None else np.ones(
        len(exp_start), bool)
    known_empty = gaps.in_runs(exp_start, state.empty_runs)
    if (tail & ~known_empty & unasked).any():
        return True
    if not (~tail & unasked).any():
        return False
    return None


@dataclass(frozen=True)
class _Expected:
    """The bars a (hours profile, timeframe, RTH) should have by now, in the period of the
    newest one: the same for every symbol sharing them, so computed once per evaluation."""

    last: datetime
    period: str
    starts: np.ndarray
    ends: np.ndarray


def _expected(profile: calendars.HoursProfile, tf: Timeframe, use_rth: bool,
              now: datetime) -> _Expected | None:
    starts, ends = recent_expected_bars(profile, tf, use_rth, now)
    if not len(starts):
        return None
    last = datetime.fromtimestamp(int(starts[-1]), UTC)
    period = tf.period_key(last)
    lo, hi = tf.period_bounds(period)
    inside = (starts >= lo.timestamp()) & (starts < hi.timestamp())
    return _Expected(last, period, starts[inside], ends[inside])


def stale_partitions(data_dir: Path, symbols: list[str], timeframes: list[Timeframe],
                     now: datetime, rth_overrides: dict[str, bool] | None = None,
                     wants: Callable[[str, str], bool] = lambda symbol, tf: True,
                     ) -> list[StalePartition]:
    """The partitions of ``symbols`` × ``timeframes`` that are behind at ``now``.

    Linear in the universe: the contract cache is read once, the expected bars are computed
    once per (hours profile, timeframe, RTH), and the newest stored bar of each partition
    comes from the store's manifest (one query per timeframe); a Parquet file is read only
    for a partition whose inner gaps could decide (see :func:`tail_behind`)."""
    store = BarStore(data_dir)
    # the resolver's contract cache, read once (it was re-read per symbol: half of an
    # evaluation's time at 2,000 symbols); entries never expire here: a contract's
    # security type and exchange do not change
    contracts = JsonCache(data_dir / "cache" / "contracts.json", float("inf")).values()
    rth_overrides = rth_overrides or {}
    cache: dict[tuple[str, str, bool], _Expected | None] = {}
    out: list[StalePartition] = []
    todo: dict[str, list[tuple[str, _Expected]]] = {tf.name: [] for tf in timeframes}
    for symbol in symbols:
        cached = contracts.get(symbol)
        for tf in timeframes:
            if not wants(symbol, tf.name):
                continue
            if cached is None:
                out.append(StalePartition(tf.name, symbol, tf.period_key(now), None, None))
                continue
            use_rth = rth_overrides.get(symbol, default_use_rth(cached["sec_type"]))
            profile = cached_profile(cached)
            slot = (profile.name, tf.name, use_rth)
            if slot not in cache:
                cache[slot] = _expected(profile, tf, use_rth, now)
            if cache[slot] is not None:
                todo[tf.name].append((symbol, cache[slot]))
    for tf in timeframes:
        if not todo[tf.name]:
            continue
        periods = sorted({exp.period for _, exp in todo[tf.name]})
        stored = {(e.symbol, e.period): e for e in store.entries(tf.name, periods=periods)}
        for symbol, exp in todo[tf.name]:
            entry = stored.get((symbol, exp.period))
            state = entry.meta.fetch if entry is not None else FetchState()
            last = entry.last_completed // 1_000_000 if entry is not None and \
                entry.last_completed is not None else None
            late = tail_behind(last, state, exp.starts, exp.ends)
            if late is None:  # only the stored bars can tell
                frame, meta = store.read_with_meta(tf.name, symbol, exp.period)
                state = fetch_state(meta)
                done = completed_starts(frame, state)
                late = behind(done, state, exp.starts, exp.ends)
                last = int(done[-1]) if len(done) else None
            if late:
                out.append(StalePartition(tf.name, symbol, exp.period, exp.last,
                                          datetime.fromtimestamp(last, UTC)
                                          if last is not None else None))
    return out
