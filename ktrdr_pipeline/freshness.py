"""Which stored partitions are behind the market (pure logic over the store).

A partition is stale when its stored bars end before the last *completed* bar IB should
have for the instrument (per its exchange calendar) and IB has not been asked for that bar
since it closed: a closed market or a holiday is not stale, and neither is a thin
instrument's minute without a trade (asked for, no bar, see :mod:`ktrdr_pipeline.loader`).
The contract facts come from the resolver's cache; a symbol never loaded is stale from the
start (its current period needs an initial load).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from .domain import calendars, gaps
from .domain.bars import FetchState, fetch_state
from .domain.timeframes import Timeframe
from .ib.contracts import JsonCache
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


def stale_partitions(data_dir: Path, symbols: list[str], timeframes: list[Timeframe],
                     now: datetime, rth_overrides: dict[str, bool] | None = None,
                     wants=lambda symbol, tf: True) -> list[StalePartition]:
    store = BarStore(data_dir)
    contracts = JsonCache(data_dir / "cache" / "contracts.json", float("inf"))
    out: list[StalePartition] = []
    for symbol in symbols:
        cached = contracts.get(symbol)
        for tf in timeframes:
            if not wants(symbol, tf.name):
                continue
            if cached is None:
                out.append(StalePartition(tf.name, symbol, tf.period_key(now), None, None))
                continue
            profile = calendars.profile_for(cached["sec_type"])
            use_rth = (rth_overrides or {}).get(symbol, default_use_rth(cached["sec_type"]))
            starts, ends = recent_expected_bars(profile, tf, use_rth, now)
            if not len(starts):
                continue
            expected = datetime.fromtimestamp(int(starts[-1]), UTC)
            period = tf.period_key(expected)
            lo, hi = tf.period_bounds(period)
            inside = (starts >= lo.timestamp()) & (starts < hi.timestamp())
            frame, meta = store.read_with_meta(tf.name, symbol, period)
            state = fetch_state(meta)
            done = completed_starts(frame, state)
            if behind(done, state, starts[inside], ends[inside]):
                last = datetime.fromtimestamp(int(done[-1]), UTC) if len(done) else None
                out.append(StalePartition(tf.name, symbol, period, expected, last))
    return out
