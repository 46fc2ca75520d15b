"""The bar grid: where IB's bars start (pure; the one home of this rule).

Intraday bars align to multiples of their size counted from local midnight of the
session's first bar in the exchange's time zone when the size divides a day and is longer
than a minute (a 1-hour NYSE bar starts at 09:30, the next at 10:00; a 4-hour ES bar at
17:00 US/Central, then 20:00), else from the Unix epoch; a session's first bar starts at
the open. Daily bars are keyed by session date at 00:00 UTC; a week's bar gathers the
sessions of a Monday-to-Sunday week and a month's the sessions of a calendar month.

Gap analysis (expected bars), validation (aligned timestamps), the planner (whole weeks
and months) and the simulator (aggregating minutes and days into bars) all use it.
Times are int64 epoch seconds.
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

DAY_S = 86400


def counts_from_midnight(size: int) -> bool:
    """Whether bars of ``size`` seconds count from local midnight (else from the epoch)."""
    return size > 60 and DAY_S % size == 0


def local_midnights(t: np.ndarray, tz: str | ZoneInfo) -> np.ndarray:
    """Epoch seconds of local midnight (in ``tz``) of the local date of each instant."""
    t = np.asarray(t, dtype=np.int64)
    if len(t) == 0:
        return t
    zone = tz.key if isinstance(tz, ZoneInfo) else tz
    local = pd.DatetimeIndex(pd.to_datetime(t, unit="s", utc=True)).tz_convert(zone)
    return local.normalize().as_unit("s").asi8


def grid_origin(session_open: int, size: int, tz: str | ZoneInfo) -> int:
    """Where the bars of one session count from: local midnight of the session's first
    bar for sizes that divide a day, else the epoch (0)."""
    if not counts_from_midnight(size):
        return 0
    return int(local_midnights(np.array([session_open]), tz)[0])


def bar_starts(t: np.ndarray, size: int, session_open: np.ndarray | int,
               origin: np.ndarray | int) -> np.ndarray:
    """The start of the bar holding each instant ``t`` (int64 epoch seconds) of a session
    opening at ``session_open`` whose grid counts from ``origin``."""
    t = np.asarray(t, dtype=np.int64)
    starts = origin + ((t - origin) // size) * size
    return np.maximum(starts, session_open)


def on_grid(t: np.ndarray, size: int, session_open: np.ndarray | int,
            origin: np.ndarray | int) -> np.ndarray:
    """Which instants ``t`` are bar starts of their session (the open, or a multiple of
    ``size`` from ``origin``)."""
    t = np.asarray(t, dtype=np.int64)
    return (t == session_open) | ((t - origin) % size == 0)


def session_bars(session_open: int, session_close: int, size: int,
                 tz: str | ZoneInfo) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of every bar of ``size`` seconds in one session [open, close): the
    last bar ends at the close."""
    if session_close <= session_open:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    origin = grid_origin(session_open, size, tz)
    first = origin + -(-(session_open - origin) // size) * size  # first grid point >= open
    on = np.arange(first, session_close, size, dtype=np.int64)
    starts = on if len(on) and on[0] == session_open else np.r_[
        np.int64(session_open), on].astype(np.int64)
    ends = np.minimum(np.append(starts[1:], session_close), starts + size)
    return starts, ends


def daily_key(day: np.ndarray) -> np.ndarray:
    """The key of a daily bar: its session date (``datetime64[D]``) at 00:00 UTC."""
    return np.asarray(day, dtype="datetime64[D]").astype("datetime64[s]").astype(np.int64)


def period_start(days: np.ndarray, bar_size: str) -> np.ndarray:
    """For session dates (``datetime64[D]``): the first day of the bar that gathers them
    — the Monday of their week for ``1 week``, the first of their month for ``1 month``,
    the date itself for ``1 day``."""
    days = np.asarray(days, dtype="datetime64[D]")
    if bar_size == "1 week":
        # 1970-01-01 was a Thursday: day number - 4 is a multiple of 7 on Mondays.
        return days - ((days.astype(np.int64) - 4) % 7).astype("timedelta64[D]")
    if bar_size == "1 month":
        return days.astype("datetime64[M]").astype("datetime64[D]")
    if bar_size == "1 day":
        return days
    raise ValueError(f"{bar_size!r} is not a bar size of a day or more")


def first_of_each_period(days: np.ndarray, bar_size: str) -> np.ndarray:
    """Indices of the first of each run of sorted session ``days`` sharing one bar."""
    group = period_start(days, bar_size).astype(np.int64)
    return np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if len(group) else np.empty(
        0, np.int64)
