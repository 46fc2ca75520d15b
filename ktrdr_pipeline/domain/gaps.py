"""Which bars a period should have, and which of them are missing (pure logic).

A period's *expected* bars are the bar starts IB produces for the instrument's sessions,
on the bar grid (:mod:`ktrdr_pipeline.domain.grid`: a 1-hour bar of NYSE starts at 09:30,
the next at 10:00; daily and larger bars are keyed by session date at 00:00 UTC). Only
bars that have *closed* by ``now`` are expected; the bar in progress is fetched with the
tail but never counted as a gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import numpy as np

from . import calendars, grid, ib_rules
from .calendars import HoursProfile


@dataclass(frozen=True)
class Segment:
    """A run of consecutive missing bars: fetch [start, end)."""

    start: datetime
    end: datetime
    bars: int


def _epoch(t: datetime) -> int:
    if t.tzinfo is None:
        raise ValueError(f"naive datetime {t!r}: pass timezone-aware datetimes")
    return int(t.timestamp())


def expected_bars(profile: HoursProfile, bar_size: str, start: datetime, end: datetime,
                  use_rth: bool, head: datetime | None = None,
                  now: datetime | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (epoch seconds) of every bar that should exist with its start in
    [start, end), from ``head`` on, closed by ``now``."""
    size = ib_rules.BAR_SIZE_SECONDS[bar_size]
    lo = _epoch(start)
    hi = _epoch(end)
    sessions = calendars.sessions_between(profile, start if not ib_rules.is_daily_or_larger(
        bar_size) else datetime.fromtimestamp(lo - 86400 * 2, UTC), end, use_rth)
    head_s = _epoch(head) if head is not None else None
    now_s = _epoch(now) if now is not None else None
    if ib_rules.is_daily_or_larger(bar_size):
        return _expected_daily(sessions, bar_size, lo, hi, head_s, now_s)
    tz = ZoneInfo(profile.tz)
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    for s in sessions:
        bar_start, bar_end = grid.session_bars(_epoch(s.open), _epoch(s.close), size, tz)
        starts.append(bar_start)
        ends.append(bar_end)
    if not starts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    st, en = np.concatenate(starts), np.concatenate(ends)
    keep = (st >= lo) & (st < hi)
    if head_s is not None:
        keep &= st >= head_s
    if now_s is not None:
        keep &= en <= now_s
    return st[keep], en[keep]


def _expected_daily(sessions, bar_size: str, lo: int, hi: int, head_s: int | None,
                    now_s: int | None) -> tuple[np.ndarray, np.ndarray]:
    keys, ends = [], []
    for s in sessions:
        key = int(grid.daily_key(np.datetime64(s.date, "D")))
        close = _epoch(s.close)
        if head_s is not None and close <= head_s:
            continue
        keys.append(key)
        ends.append(close)
    k, e = np.array(keys, dtype=np.int64), np.array(ends, dtype=np.int64)
    if bar_size != "1 day" and len(k):
        first = grid.first_of_each_period(k.astype("datetime64[s]").astype("datetime64[D]"),
                                          bar_size)
        last = np.r_[first[1:], len(k)] - 1
        k, e = k[first], e[last]
    keep = (k >= lo) & (k < hi)
    if now_s is not None:
        keep &= e <= now_s
    return k[keep], e[keep]


def missing_segments(expected_starts: np.ndarray, expected_ends: np.ndarray,
                     stored_starts: np.ndarray, known_empty: Runs = ()) -> list[Segment]:
    """Runs of expected bars absent from ``stored_starts`` (epoch seconds), as segments;
    bars inside ``known_empty`` (IB has none) count as present.

    Consecutive missing bars form one segment even across a closed period between them
    (the planner skips the closed hours); a stored bar between two missing ones splits
    them."""
    missing = ~present(expected_starts, stored_starts, known_empty)
    return [
        Segment(datetime.fromtimestamp(int(expected_starts[a]), UTC),
                datetime.fromtimestamp(int(expected_ends[b]), UTC), int(b - a + 1))
        for a, b in _consecutive(missing)
    ]


def present(expected_starts: np.ndarray, stored_starts: np.ndarray,
            known_empty: Runs = ()) -> np.ndarray:
    """Which expected bars are stored or known to have no bar at IB."""
    return np.isin(expected_starts, stored_starts) | in_runs(expected_starts, known_empty)


def _consecutive(flags: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of every run of consecutive true ``flags``."""
    idx = np.flatnonzero(flags)
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    firsts = np.r_[idx[0], idx[breaks + 1]]
    lasts = np.r_[idx[breaks], idx[-1]]
    return list(zip(firsts.tolist(), lasts.tolist(), strict=True))


#: [start, end) epoch spans of consecutive expected bars, sorted and disjoint.
Runs = Sequence[tuple[int, int]]


def runs_of(expected_starts: np.ndarray, expected_ends: np.ndarray,
            flags: np.ndarray) -> list[tuple[int, int]]:
    """The flagged expected bars as [start, end) spans of consecutive ones (compact enough
    to keep in a partition's metadata)."""
    return [(int(expected_starts[a]), int(expected_ends[b])) for a, b in _consecutive(flags)]


def in_runs(starts: np.ndarray, runs: Runs) -> np.ndarray:
    """Which bar ``starts`` (epoch seconds) lie inside one of ``runs``."""
    out = np.zeros(len(starts), dtype=bool)
    if len(runs) == 0 or len(starts) == 0:
        return out
    spans = np.asarray(runs, dtype=np.int64)
    k = np.searchsorted(spans[:, 0], starts, side="right") - 1
    inside = k >= 0
    out[inside] = starts[inside] < spans[k[inside], 1]
    return out


def runs_outside(runs: Runs, lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of ``runs`` outside [lo, hi)."""
    out: list[tuple[int, int]] = []
    for a, b in runs:
        if a < lo:
            out.append((a, min(b, lo)))
        if b > hi:
            out.append((max(a, hi), b))
    return out
