"""Which stored partitions are behind the market (pure logic over the store).

A partition is stale when its stored bars end before the last *completed* bar IB should
have for the instrument (per its exchange calendar): a closed market or a holiday is not
stale. The contract facts come from the resolver's cache; a symbol never loaded is stale
from the start (its current period needs an initial load).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from . import calendars, gaps
from .ib.contracts import JsonCache
from .loader import default_use_rth, stored_partial_from
from .store.parquet import BarStore
from .timeframes import Timeframe


@dataclass(frozen=True)
class StalePartition:
    timeframe: str
    symbol: str
    period: str
    last_expected: datetime | None  # the newest bar IB should have (None: unknown contract)
    last_stored: datetime | None


def last_expected_bar(profile: calendars.HoursProfile, tf: Timeframe, use_rth: bool,
                      now: datetime) -> datetime | None:
    """The start of the newest bar that has closed by ``now``."""
    lookback = timedelta(days=40 if tf.is_daily_or_larger else 12)
    if tf.bar_size in ("1 week", "1 month"):
        lookback = timedelta(days=70)
    starts, _ = gaps.expected_bars(profile, tf.bar_size, now - lookback, now, use_rth, now=now)
    return datetime.fromtimestamp(int(starts[-1]), UTC) if len(starts) else None


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
            expected = last_expected_bar(profile, tf, use_rth, now)
            if expected is None:
                continue
            period = tf.period_key(expected)
            frame = store.read(tf.name, symbol, period)
            partial = stored_partial_from(store.read_meta(tf.name, symbol, period))
            stored = frame.index
            if partial is not None:
                stored = stored[stored.asi8 // 10**9 < partial]
            last = stored[-1].to_pydatetime() if len(stored) else None
            if last is None or last < expected:
                out.append(StalePartition(tf.name, symbol, period, expected, last))
    return out
